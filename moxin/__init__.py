"""moxin: the Moxin-7B recipe, end to end."""
