"""CLIP models and vectors: which model and weights (``model``), decoding and embedding
(``embed``), the clip stage's outputs on disk (``pool``), the DataComp ``.npz`` export."""
