"""tirl: train LLM agents to use tools with reinforcement learning.

`import tirl` is light: it imports neither torch nor any optional engine. Submodules load what they
need when used.
"""

__version__ = "0.1.0"
