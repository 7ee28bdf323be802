"""minicnn: the fast.ai 2018 lesson-2 recipe, one small module a concept."""
__version__ = "0.1.0"
