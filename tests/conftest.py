import sys
from pathlib import Path

# tests/tiny_models.py is a helper module, imported by name from the tests.
sys.path.insert(0, str(Path(__file__).parent))
