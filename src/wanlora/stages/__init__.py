"""Stage wiring: each module reads params.yaml, names the paths, and calls one library function.

Kept apart from the logic so a stage's DVC code deps are exactly its wiring plus the package
folders it imports, and so the `stages/*.py` files a workspace holds stay three lines long.
"""
