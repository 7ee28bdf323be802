"""minicnn: the fast.ai 2018 lesson-2 recipe for image classifiers, one small module a concept.

Import the module behind a step by its name, e.g. `import minicnn.lr_find as lr_find`;
this file defines nothing else, so no name here can hide a module.
"""
__version__ = "0.1.0"
