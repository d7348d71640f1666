"""Optional integrations with training frameworks: leaves the core never imports.

* :mod:`sampleweights.integrations.lightning` — a PyTorch Lightning ``Callback``
  (``pip install "sampleweights[lightning]"``).
* :mod:`sampleweights.integrations.hf` — a Hugging Face ``Trainer`` subclass and
  ``TrainerCallback`` (``pip install "sampleweights[hf]"``).

Import the submodule you need; importing this package imports neither framework.
"""

from __future__ import annotations

__all__: list[str] = []
