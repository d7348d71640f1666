"""Root pytest configuration: skip collecting optional integrations whose framework is missing.

``--doctest-modules`` imports every module under ``src/``; the Lightning and Hugging Face
integrations import their framework, which is an optional extra.
"""

from __future__ import annotations

import importlib.util

collect_ignore_glob: list[str] = []
if importlib.util.find_spec("lightning") is None:
    collect_ignore_glob.append("src/sampleweights/integrations/lightning.py")
if importlib.util.find_spec("transformers") is None:
    collect_ignore_glob.append("src/sampleweights/integrations/hf.py")
