"""lvmkit: latent-variable models on Pyro.

Write a model p(x, z) and a guide q(z | x) as a Pyro model/guide pair — or bring the pair you
already have — train it with :func:`fit`, and score it with :func:`evaluate` (ELBO,
importance-sampled log-likelihood, Pareto k̂).

The public names are listed once, in ``__init__.pyi``; each is imported when first used
(``lazy_loader``, SPEC 1), so that ``import lvmkit`` and the ``lvmkit`` command's ``--help`` do
not wait for torch and Pyro to load.
"""

import lazy_loader

from lvmkit.base import __version__

__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
__all__ = [*__all__, "__version__"]
