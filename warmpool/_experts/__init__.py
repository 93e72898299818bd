"""Experts as units: each (layer, expert)'s byte ranges in the stacked expert tensors
(``slices``), their hotness learned from page-cache residency (``ranking``), and the profile
file that carries a ranking between runs (``profile``).  docs/experts.md, docs/profile.md."""
