"""A synthetic DataComp-format metadata pool for timing the basic filter.

``write_pool(folder, rows, files)`` writes ``files`` Parquet files
(``00000000.parquet`` …) with DataComp's metadata columns and types:

    uid (string, 32 lowercase hex, unique), url (string), text (string),
    original_width, original_height (int64), sha256 (string, 64 hex),
    clip_b32_similarity_score, clip_l14_similarity_score (float64)

No ``.npz`` embeddings are written: the basic filter never reads them. URLs
point at ``http://127.0.0.1:9/`` (the discard port) and are never fetched.
Everything is seeded numpy and Arrow compute, no Python loop per row, so 10^6
rows take a few seconds.

What costs time in DataComp's basic filter is the caption (one fastText call
per row, ``str.split``) and, a little, the image sizes, so those are shaped
like web alt-text and web images (fractions are of all rows, by construction):

Captions
    - 50 % English: words drawn from an embedded English list.
    - 38 % other languages, from small embedded word lists: French, German,
      Spanish 7 % each; Portuguese, Italian, Russian 4 % each; Chinese and
      Japanese 2.5 % each (no spaces between words in 70 % of them, so most
      are one ``split()`` word).
    - 4 % boilerplate alt-text: camera/file names (``IMG_1234.jpg``,
      ``DSC01234.JPG``), generic words (``image``, ``logo``), dimensions
      (``1920x1080``), URLs, bare numbers.
    - 8 % repeated alt-texts: a Zipf draw from 40 stock captions ("Click to
      enlarge", "Free shipping on all orders", "商品画像" …), so the most
      common one appears on ~2 % of all rows.
    Word counts (English and other languages) are lognormal with median 8
    words (sigma 0.75): ~9 % have 0–2 words, ~0.3 % are empty; 0.3 % of rows
    are keyword-stuffed descriptions of 60–400 words. Half the captions are
    capitalised; 0.5 % contain newlines between words.

Image sizes (``original_width`` × ``original_height``)
    - 93.5 % photos: longer side lognormal, median 400 px (sigma 0.75),
      aspect ratio exp(|N(0, 0.3)|) (mostly 1–2), 65 % landscape.
    - 3 % banners and strips: aspect ratio uniform in 3–8.
    - 2.5 % icons and tracking pixels: 1×1 to 64×64.
    - 1 % exact boundary cases of the DataComp rules: 200×200, 199×600,
      600×200 (ratio exactly 3), 601×200, 300×900, 300×901, …
    About 31 % of rows fail "shorter side >= 200" and about 3 % fail
    "aspect ratio <= 3" (``python benchmarks/pool.py`` prints the measured
    shares of a generated pool).

Measured on 10^6 rows, seed 0 (rows each DataComp rule rejects on its own):
``len(text.split()) > 2`` 196,295; ``len(text) > 5`` 50,495; shorter side >= 200
312,526; aspect ratio <= 3 33,226; fastText lid.176.ftz top-1 == "en" 424,002.
All five rules together keep 319,790 rows.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)

WORDS = {
    "en": (
        "the a of and with in on for to at by from new old red blue black white green small "
        "large big little beautiful modern vintage classic wooden leather cotton summer winter "
        "spring autumn day night sunset beach mountain lake river forest city street house home "
        "kitchen garden room bedroom living bathroom office table chair sofa bed lamp window door "
        "wall floor dog cat bird horse flower tree rose car bike truck boat train plane road "
        "bridge church castle building tower park woman man girl boy child family people friends "
        "wedding dress shirt shoes bag watch ring necklace gold silver steel glass wood stone "
        "photo picture view landscape portrait design art painting drawing print poster card "
        "logo pattern style fashion food cake chocolate coffee tea pizza salad bread fruit apple "
        "water snow rain sky cloud sun moon star light dark happy cute funny best top free sale "
        "set pack kit box case cover holder stand rack shelf cabinet drawer mirror rug pillow "
        "blanket curtain towel toy game book guitar piano camera phone laptop computer screen "
        "high quality premium custom handmade natural organic fresh original luxury simple"
    ),
    "fr": (
        "le la les un une des de du et avec dans sur pour par en au aux maison jardin cuisine "
        "chambre salon table chaise lit lampe fenêtre porte mur rouge bleu noir blanc vert petit "
        "grand belle beau nouveau ancien moderne bois cuir été hiver printemps automne jour nuit "
        "plage montagne lac rivière forêt ville rue chien chat oiseau cheval fleur arbre voiture "
        "vélo bateau femme homme enfant famille robe chemise chaussures sac montre bague or argent "
        "photo vue paysage affiche gâteau café pain fruit eau neige ciel soleil cadeau prix"
    ),
    "de": (
        "der die das ein eine und mit in auf für von zu im am aus Haus Garten Küche Zimmer "
        "Wohnzimmer Tisch Stuhl Bett Lampe Fenster Tür Wand rot blau schwarz weiß grün klein groß "
        "schöne neue alte moderne Holz Leder Sommer Winter Frühling Herbst Tag Nacht Strand Berg "
        "See Fluss Wald Stadt Straße Hund Katze Vogel Pferd Blume Baum Auto Fahrrad Boot Frau "
        "Mann Kind Familie Kleid Hemd Schuhe Tasche Uhr Ring Gold Silber Foto Bild Ansicht "
        "Landschaft Kuchen Kaffee Brot Obst Wasser Schnee Himmel Sonne Geschenk günstig kaufen"
    ),
    "es": (
        "el la los las un una de del y con en sobre para por al casa jardín cocina habitación "
        "sala mesa silla cama lámpara ventana puerta pared rojo azul negro blanco verde pequeño "
        "grande hermosa nuevo antiguo moderno madera cuero verano invierno primavera otoño día "
        "noche playa montaña lago río bosque ciudad calle perro gato pájaro caballo flor árbol "
        "coche bicicleta barco mujer hombre niño familia vestido camisa zapatos bolso reloj "
        "anillo oro plata foto vista paisaje pastel café pan fruta agua nieve cielo sol regalo"
    ),
    "pt": (
        "o a os as um uma de do da e com em no na para por ao casa jardim cozinha quarto sala "
        "mesa cadeira cama janela porta parede vermelho azul preto branco verde pequeno grande "
        "bonita novo antigo moderno madeira couro verão inverno dia noite praia montanha lago "
        "rio floresta cidade rua cachorro gato pássaro cavalo flor árvore carro bicicleta barco "
        "mulher homem criança família vestido camisa sapatos bolsa relógio ouro prata foto vista"
    ),
    "it": (
        "il lo la i gli le un una di del della e con in su per da al casa giardino cucina camera "
        "soggiorno tavolo sedia letto lampada finestra porta muro rosso blu nero bianco verde "
        "piccolo grande bella nuovo antico moderno legno pelle estate inverno giorno notte "
        "spiaggia montagna lago fiume bosco città strada cane gatto uccello cavallo fiore albero "
        "macchina bicicletta barca donna uomo bambino famiglia vestito camicia scarpe borsa foto"
    ),
    "ru": (
        "и в на с для по из от к у дом сад кухня комната гостиная стол стул кровать лампа окно "
        "дверь стена красный синий черный белый зеленый маленький большой красивая новый старый "
        "современный дерево кожа лето зима весна осень день ночь пляж гора озеро река лес город "
        "улица собака кошка птица лошадь цветок дерево машина велосипед лодка женщина мужчина "
        "ребенок семья платье рубашка обувь сумка часы кольцо золото серебро фото вид пейзаж"
    ),
    "zh": (
        "的 和 在 新 款 大 小 红色 蓝色 黑色 白色 绿色 美丽 现代 复古 木 皮 夏天 冬天 春天 "
        "秋天 白天 晚上 海滩 山 湖 河 森林 城市 街道 房子 家 厨房 花园 房间 卧室 客厅 桌子 "
        "椅子 沙发 床 灯 窗户 门 狗 猫 鸟 马 花 树 汽车 自行车 船 女人 男人 孩子 家庭 连衣裙 "
        "衬衫 鞋 包 手表 戒指 金 银 照片 风景 蛋糕 咖啡 茶 水果 水 雪 天空 太阳 月亮 礼物 "
        "高清 图片 壁纸 设计 时尚 免费 下载"
    ),
    "ja": (
        "の と に で を は が 新しい 大きな 小さな 赤い 青い 黒い 白い 美しい モダン "
        "ヴィンテージ 木製 夏 冬 春 秋 夜 海 山 湖 川 森 街 家 キッチン 庭 部屋 寝室 リビング "
        "テーブル 椅子 ソファ ベッド ランプ 窓 ドア 犬 猫 鳥 馬 花 木 車 自転車 船 女性 男性 "
        "子供 家族 ドレス シャツ 靴 バッグ 時計 指輪 金 銀 写真 風景 ケーキ コーヒー お茶 "
        "果物 水 雪 空 太陽 月 プレゼント 送料無料 人気 おしゃれ"
    ),
}
#: (language, share of all rows) for the generated-caption languages.
LANGUAGES = [
    ("en", 0.50), ("fr", 0.07), ("de", 0.07), ("es", 0.07), ("pt", 0.04), ("it", 0.04),
    ("ru", 0.04), ("zh", 0.025), ("ja", 0.025),
]  # fmt: skip
BOILERPLATE_SHARE = 0.04
REPEATED_SHARE = 0.08
REPEATED = [
    "Click to enlarge", "Product image", "image", "Free shipping on all orders", "logo",
    "Stock Photo", "Home", "placeholder", "Loading...", "thumbnail", "No image available",
    "Picture of product", "Add to cart", "Royalty free stock photo", "Download free vector",
    "Image may contain: one or more people", "Best price guaranteed", "Shop now", "banner",
    "Vector illustration isolated on white background", "商品画像", "图片", "Imagen del producto",
    "Bild vergrößern", "Voir l'image en grand", "Фото", "Foto del prodotto", "Imagem do produto",
    "Read more", "Photo 1", "View larger image", "Follow us on Instagram", "avatar", "icon",
    "Default image", "Gallery image", "Featured image", "Customer review photo",
    "High resolution wallpaper for desktop", "Sale!",
]  # fmt: skip
CJK = ("zh", "ja")


def random_hex(rng: np.random.Generator, n: int, n_bytes: int) -> tuple[pa.Array, np.ndarray]:
    """``n`` random lowercase hex strings of ``2 * n_bytes`` digits, and their raw bytes."""
    raw = rng.integers(0, 256, size=(n, n_bytes), dtype=np.uint8)
    digits = np.empty((n, 2 * n_bytes), np.uint8)
    digits[:, 0::2] = _HEX[raw >> 4]
    digits[:, 1::2] = _HEX[raw & 15]
    offsets = np.arange(n + 1, dtype=np.int64) * (2 * n_bytes)
    array = pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(offsets), pa.py_buffer(digits.tobytes())
    )
    return array.cast(pa.string()), raw


def _join_words(
    rng: np.random.Generator, vocab: pa.Array, counts: np.ndarray, separators: pa.Array
) -> pa.Array:
    """One caption per entry of ``counts``: that many random words of ``vocab``, joined."""
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    words = vocab.take(pa.array(rng.integers(0, len(vocab), offsets[-1])))
    lists = pa.LargeListArray.from_arrays(pa.array(offsets), words)
    return pc.binary_join(lists, separators).cast(pa.string())


def _boilerplate(rng: np.random.Generator, n: int) -> pa.Array:
    """File names, generic words, dimensions, URLs and numbers, as web alt-text has them."""
    number = pa.array(rng.integers(0, 100_000, n)).cast(pa.string())
    kind = rng.choice(6, n, p=[0.35, 0.15, 0.2, 0.1, 0.1, 0.1])
    prefix = pa.array(np.array(["IMG_", "DSC", "", "", "https://www.example.com/p/", ""])[kind])
    suffix = pa.array(np.array([".jpg", ".JPG", "", "x1080", ".html", ""])[kind])
    generic = np.array(["image", "photo", "picture", "untitled", "img", "logo"])
    middle = pc.if_else(
        pa.array(kind == 2), pa.array(generic[rng.integers(0, len(generic), n)]), number
    )
    return pc.binary_join_element_wise(prefix, middle, suffix, "")


def _captions(rng: np.random.Generator, n: int) -> tuple[pa.Array, np.ndarray]:
    """``n`` captions and the category of each (a language code, "boilerplate", "repeated")."""
    shares = [s for _, s in LANGUAGES] + [BOILERPLATE_SHARE, REPEATED_SHARE]
    names = np.array([lang for lang, _ in LANGUAGES] + ["boilerplate", "repeated"])
    category = rng.choice(len(names), n, p=np.array(shares) / sum(shares))
    counts = np.floor(rng.lognormal(np.log(8), 0.75, n)).astype(np.int64)
    stuffed = rng.random(n) < 0.003
    counts[stuffed] = rng.integers(60, 401, stuffed.sum())
    counts = np.minimum(counts, 400)
    spaced = rng.random(n) < 0.3  # CJK alt-text with spaces between words
    newline = rng.random(n) < 0.005

    captions = pa.nulls(n, pa.string())
    for code, (lang, _) in enumerate(LANGUAGES):
        rows = np.flatnonzero(category == code)
        sep = np.full(len(rows), " ", dtype=object)
        if lang in CJK:
            sep[~spaced[rows]] = ""
        sep[newline[rows]] = "\n"
        vocab = pa.array(WORDS[lang].split())
        text = _join_words(rng, vocab, counts[rows], pa.array(sep, pa.string()))
        captions = _scatter(captions, rows, text)
    rows = np.flatnonzero(names[category] == "boilerplate")
    captions = _scatter(captions, rows, _boilerplate(rng, len(rows)))
    rows = np.flatnonzero(names[category] == "repeated")
    zipf = 1.0 / np.arange(1, len(REPEATED) + 1)
    pick = rng.choice(len(REPEATED), len(rows), p=zipf / zipf.sum())
    captions = _scatter(captions, rows, pa.array(REPEATED).take(pa.array(pick)))
    capital = pa.array(rng.random(n) < 0.5)
    first = pc.utf8_upper(pc.utf8_slice_codeunits(captions, 0, 1))
    capitalised = pc.binary_join_element_wise(first, pc.utf8_slice_codeunits(captions, 1), "")
    captions = pc.if_else(capital, capitalised, captions)
    return captions, names[category]


def _scatter(target: pa.Array, rows: np.ndarray, values: pa.Array) -> pa.Array:
    """``target`` with ``values`` placed at ``rows``."""
    mask = np.zeros(len(target), bool)
    mask[rows] = True
    return pc.replace_with_mask(target, pa.array(mask), values.cast(target.type))


def _sizes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Original widths and heights (int64) of web images; see the module docstring."""
    kind = rng.choice(4, n, p=[0.935, 0.03, 0.025, 0.01])
    longer = np.clip(rng.lognormal(np.log(400), 0.75, n), 1, 12_000)
    ratio = np.exp(np.abs(rng.normal(0, 0.3, n)))
    ratio[kind == 1] = rng.uniform(3, 8, (kind == 1).sum())
    longer[kind == 1] = np.maximum(longer[kind == 1], 300)
    longer = np.rint(longer).astype(np.int64)
    shorter = np.maximum(np.rint(longer / ratio).astype(np.int64), 1)
    icons = kind == 2
    side = rng.choice(np.array([1, 16, 24, 32, 48, 64]), icons.sum())
    longer[icons], shorter[icons] = side, side
    edges = np.array([[200, 200], [199, 600], [600, 200], [601, 200], [300, 900], [300, 901],
                      [200, 199], [1, 3], [201, 603], [603, 201]])  # fmt: skip
    edge_rows = np.flatnonzero(kind == 3)
    pick = edges[rng.integers(0, len(edges), len(edge_rows))]
    longer[edge_rows], shorter[edge_rows] = pick[:, 0], pick[:, 1]
    landscape = rng.random(n) < 0.65
    width = np.where(landscape, longer, shorter)
    height = np.where(landscape, shorter, longer)
    return width, height


def pool_table(rows: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """The whole pool as one table, and each row's caption category."""
    rng = np.random.default_rng(seed)
    uid, raw = random_hex(rng, rows, 16)
    if len(np.unique(raw.view("V16"))) != rows:
        raise RuntimeError(f"seed {seed}: two random 128-bit uids collided; use another seed")
    text, category = _captions(rng, rows)
    width, height = _sizes(rng, rows)
    index = pa.array(np.arange(rows)).cast(pa.string())
    url = pc.binary_join_element_wise("http://127.0.0.1:9/", index, ".jpg", "")
    sha256, _ = random_hex(rng, rows, 32)
    b32 = np.clip(rng.normal(0.28, 0.05, rows), -1, 1)
    l14 = np.clip(b32 - 0.03 + rng.normal(0, 0.02, rows), -1, 1)
    table = pa.table(
        {
            "uid": uid,
            "url": url,
            "text": text,
            "original_width": pa.array(width, pa.int64()),
            "original_height": pa.array(height, pa.int64()),
            "sha256": sha256,
            "clip_b32_similarity_score": pa.array(b32, pa.float64()),
            "clip_l14_similarity_score": pa.array(l14, pa.float64()),
        }
    )
    return table, category


def write_pool(
    folder: Path, rows: int, files: int = 1, seed: int = 0
) -> tuple[pa.Table, np.ndarray]:
    """Write the pool as ``files`` Parquet files of equal size; return the table and categories."""
    folder.mkdir(parents=True, exist_ok=True)
    table, category = pool_table(rows, seed)
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        pq.write_table(table.slice(lo, hi - lo), folder / f"{i:08d}.parquet")
    return table, category


def rule_masks(table: pa.Table) -> dict[str, np.ndarray]:
    """True where a row passes each non-language rule of DataComp's basic filter."""
    text = table["text"].to_pylist()
    n_words = np.fromiter((len(t.split()) for t in text), np.int64, len(text))
    chars = np.fromiter((len(t) for t in text), np.int64, len(text))
    w = table["original_width"].to_numpy().astype(np.float64)
    h = table["original_height"].to_numpy().astype(np.float64)
    shorter, longer = np.minimum(w, h), np.maximum(w, h)
    return {
        "words > 2": n_words > 2,
        "chars > 5": chars > 5,
        "min side >= 200": shorter >= 200,
        "aspect ratio <= 3": longer / shorter <= 3.0,
    }


def composition(table: pa.Table, category: np.ndarray, english: np.ndarray | None = None) -> dict:
    """Shares of caption categories, and how many rows each DataComp rule rejects.

    ``english`` (fastText top-1 == "en" per row) adds the language rule and the
    number of rows the whole basic filter keeps.
    """
    n = table.num_rows
    masks = rule_masks(table)
    if english is not None:
        masks["fastText en"] = np.asarray(english, bool)
    names, counts = np.unique(category, return_counts=True)
    out = {
        "rows": n,
        "captions": {str(k): round(int(c) / n, 4) for k, c in zip(names, counts)},
        "rejected_by_rule": {k: int((~m).sum()) for k, m in masks.items()},
    }
    kept = np.logical_and.reduce(list(masks.values()))
    out["kept" if english is not None else "kept_before_language"] = int(kept.sum())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    table, category = write_pool(args.folder, args.rows, args.files, args.seed)
    print(f"wrote {args.rows:,} rows in {args.files} files in {time.perf_counter() - start:.1f} s")
    for key, value in composition(table, category).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
