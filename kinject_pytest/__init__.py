"""kinject-pytest: treat what a language model knows as pytest test cases."""

__version__ = "0.1.0"
