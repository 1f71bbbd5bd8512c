"""Caption text: words and n-grams, concept lists and MetaCLIP's substring matching."""
