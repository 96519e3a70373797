"""The live view (pygame): sources, back modes, tiling, the app and its drawing."""
import os

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
