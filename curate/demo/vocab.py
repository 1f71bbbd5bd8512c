"""The demo pool's controlled vocabulary and its words in English, French, German and Spanish.

Every image of the pool is a scene of a few coloured shapes on a patterned
background, so the ground truth of what an image shows is exact, and a
caption can be written from it in any language the tables below cover. The
pool's ``eval/labels.parquet`` has one column per key of ``VOCABULARY``, and
each key is one zero-shot task of the eval set (``curate.demo.tasks``).

Translations carry grammatical gender (and German its adjective endings)
because ungrammatical captions are a weaker test of a language filter than
the real thing.
"""

from __future__ import annotations

#: Head first: the pool draws shapes with Zipf-like weights in this order (see ``scene.py``).
SHAPES = (
    "circle", "square", "triangle", "star", "heart", "cross",
    "diamond", "hexagon", "pentagon", "ring", "crescent", "arrow",
)  # fmt: skip
COLOURS = (
    "red", "orange", "yellow", "green", "blue", "purple",
    "pink", "brown", "black", "white", "gray",
)  # fmt: skip
PATTERNS = ("plain", "striped", "dotted", "gradient")
SIZES = ("small", "medium", "large")

#: Concept attribute -> class names; the eval labels have one column per attribute.
VOCABULARY: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "background": PATTERNS,
}

RGB = {
    "red": (220, 30, 40), "orange": (245, 140, 20), "yellow": (250, 220, 30),
    "green": (40, 160, 60), "blue": (30, 80, 210), "purple": (130, 50, 170),
    "pink": (245, 130, 190), "brown": (120, 70, 30), "black": (20, 20, 20),
    "white": (245, 245, 245), "gray": (128, 128, 128),
}  # fmt: skip

# --- French: nouns with gender, colours as (masculine, feminine), sizes go before the noun.
FR_SHAPES = {
    "circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
    "star": ("étoile", "f"), "heart": ("cœur", "m"), "cross": ("croix", "f"),
    "diamond": ("losange", "m"), "hexagon": ("hexagone", "m"), "pentagon": ("pentagone", "m"),
    "ring": ("anneau", "m"), "crescent": ("croissant", "m"), "arrow": ("flèche", "f"),
}  # fmt: skip
FR_COLOURS = {
    "red": ("rouge", "rouge"), "orange": ("orange", "orange"), "yellow": ("jaune", "jaune"),
    "green": ("vert", "verte"), "blue": ("bleu", "bleue"), "purple": ("violet", "violette"),
    "pink": ("rose", "rose"), "brown": ("marron", "marron"), "black": ("noir", "noire"),
    "white": ("blanc", "blanche"), "gray": ("gris", "grise"),
}  # fmt: skip
FR_SIZES = {"small": ("petit", "petite"), "large": ("grand", "grande")}
FR_PATTERNS = {"plain": "uni", "striped": "rayé", "dotted": "à pois", "gradient": "en dégradé"}

# --- German: nouns with gender; adjective stems take the ending of their case and gender.
DE_SHAPES = {
    "circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"),
    "star": ("Stern", "m"), "heart": ("Herz", "n"), "cross": ("Kreuz", "n"),
    "diamond": ("Raute", "f"), "hexagon": ("Sechseck", "n"), "pentagon": ("Fünfeck", "n"),
    "ring": ("Ring", "m"), "crescent": ("Halbmond", "m"), "arrow": ("Pfeil", "m"),
}  # fmt: skip
DE_COLOURS = {
    "red": "rot", "orange": "orangefarben", "yellow": "gelb", "green": "grün", "blue": "blau",
    "purple": "violett", "pink": "rosafarben", "brown": "braun", "black": "schwarz",
    "white": "weiß", "gray": "grau",
}  # fmt: skip
DE_SIZES = {"small": "klein", "large": "groß"}
#: (article, adjective ending) after "ein" per case and gender.
DE_ARTICLE = {
    ("nom", "m"): ("ein", "er"), ("nom", "f"): ("eine", "e"), ("nom", "n"): ("ein", "es"),
    ("acc", "m"): ("einen", "en"), ("acc", "f"): ("eine", "e"), ("acc", "n"): ("ein", "es"),
}  # fmt: skip
#: Background phrases (a caption names the background's pattern, never its colour).
DE_PATTERNS = {
    "plain": "auf einem einfarbigen Hintergrund",
    "striped": "auf einem gestreiften Hintergrund",
    "dotted": "auf einem gepunkteten Hintergrund",
    "gradient": "auf einem Hintergrund mit Farbverlauf",
}

# --- Spanish: nouns with gender; colour then size after the noun.
ES_SHAPES = {
    "circle": ("círculo", "m"), "square": ("cuadrado", "m"), "triangle": ("triángulo", "m"),
    "star": ("estrella", "f"), "heart": ("corazón", "m"), "cross": ("cruz", "f"),
    "diamond": ("rombo", "m"), "hexagon": ("hexágono", "m"), "pentagon": ("pentágono", "m"),
    "ring": ("anillo", "m"), "crescent": ("media luna", "f"), "arrow": ("flecha", "f"),
}  # fmt: skip
ES_COLOURS = {
    "red": ("rojo", "roja"), "orange": ("naranja", "naranja"),
    "yellow": ("amarillo", "amarilla"), "green": ("verde", "verde"), "blue": ("azul", "azul"),
    "purple": ("morado", "morada"), "pink": ("rosa", "rosa"), "brown": ("marrón", "marrón"),
    "black": ("negro", "negra"), "white": ("blanco", "blanca"), "gray": ("gris", "gris"),
}  # fmt: skip
ES_SIZES = {"small": ("pequeño", "pequeña"), "large": ("grande", "grande")}
ES_PATTERNS = {
    "plain": "liso",
    "striped": "a rayas",
    "dotted": "de lunares",
    "gradient": "degradado",
}

#: Alt-text a CMS or a camera fills in; each is at most two words and matches the
#: boilerplate filter. Drawn with Zipf-like weights, so the first ones repeat across many rows.
BOILERPLATE = (
    "image", "IMG_0423.JPG", "click here", "photo", "untitled", "DSC_0091.jpg",
    "https://example.com/img/banner.jpg", "thumbnail", "www.example.com", "no image",
)  # fmt: skip

#: Pages a web server returns at an image url: soft 404s, logins, consent walls.
HTML_PAGES = (
    "<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
    "<body><h1>Not Found</h1><p>The requested image was not found.</p></body></html>",
    "<!DOCTYPE html><html><head><title>Sign in</title></head><body><form action='/login'>"
    "<input name='user'><input name='password' type='password'></form></body></html>",
    "<html><head><title>Cookie settings</title></head><body><p>We value your privacy."
    "</p><button>Accept all</button></body></html>",
)
