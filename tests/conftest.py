import os
import sys

# Tests import the top-level stage files (model.py, losses.py, ...) directly.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
