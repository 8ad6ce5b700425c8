"""The DINO scripts' shared code beyond what utils.py holds itself, one module per concern; utils.py re-exports the
names the scripts use, so `utils.<name>` reaches them all. Importing the package imports none of its modules."""
