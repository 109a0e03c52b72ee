"""``lvmkit bench vae <suite>``: the VAE family on binarized MNIST, on the papers' protocols, with
your own model beside the built-in ones and the published numbers.

Each suite is a protocol (:class:`Protocol`: data, training budget, optimizer and schedule,
evaluation) and a set of settings; every *contender* — the built-in model, the hand-written
PyTorch reference where there is one, and any pair you bring (:mod:`lvmkit.benchmarks.contenders`)
— is trained in every setting under the same protocol and scored the same way, and the papers'
numbers are rows of the same table. Every run records learning curves (the metric per epoch),
drawn with the paper's final number as a dashed line; the table says where each curve ends and
how fast it still moved over the last quarter of training.

Suites (``run(profile, device=..., figures_dir=..., contenders=..., only=..., settings=...)``):

- ``latent``: AEVB Fig. 2 (Kingma & Welling 2014) — latent dims 3, 5, 10, 20, 200, one hidden
  layer of 500 tanh units, trained with Adagrad (lr 0.02, from the paper's {0.01, 0.02, 0.1}),
  minibatches of 100 and the N(0, I) prior on the parameters as weight decay; the test bound
  against training examples seen;
- ``iwae``: IWAE Table 1 (Burda, Grosse & Salakhutdinov 2016) — 784-200-200-50 tanh, dynamic
  binarization, Adam (β = 0.9, 0.999, ε = 1e-4), minibatches of 20, the learning rate
  0.001 · 10^(−i/7) for 3^i epochs, i = 0…7 (3,280 epochs; ``full`` keeps the 8 stages in the same
  proportions over its own length), VAE (k = 1, 5, 50) and IWAE (k = 5, 50), test NLL with
  K = 5000;
- ``m2``: Kingma et al. (2014) M2 with 100 / 600 / 1000 / 3000 labels — each image once an epoch
  (the labelled ones spread over the unlabelled minibatches), α = 0.1 · N over the labelled
  images' mean, Adam (lr 3e-4, β = 0.9, 0.999: the paper's "decays 0.1 and 0.001"), batch 200
  (Pyro's example: the paper does not say); test accuracy of q(y | x) beside the same classifier
  trained on the labelled images alone — the column that says whether the unlabelled images
  helped — and beside the paper's and Pyro's example's numbers;
- ``cvae``: Sohn et al. (2015) quadrant completion as Pyro's CVAE example does it — the
  baseline trained first, the CVAE's condition given the baseline's guess in the hidden pixels,
  early stopping (patience 3 on the validation split, the best epoch's weights kept);
- ``variants``: VAE (three likelihoods), β-VAE, KL warm-up, IWAE, RWS, AE, DAE, CAE and AAE on the
  same data and network;
- ``pythae``: the families lvmkit shares with pythae (VAE, IWAE, VampPrior), each trained by
  lvmkit and by pythae's own classes and trainer on the same images and initial weights, scored
  by one estimator (and pythae's ``get_nll`` beside it), with each epoch's time and pythae's
  reproducibility table (:mod:`lvmkit.benchmarks.pythae_side`).

Profiles: ``quick`` (seconds; the tests), ``full`` (what a 2-core CPU does in its hours: the
papers' optimizers and schedules, shorter), ``paper`` (the papers' lengths; GPU days).
"""

from __future__ import annotations

from lvmkit.benchmarks import cvae, iwae, latent, m2, pythae_side, variants

SUITES = {
    "latent": latent.run,
    "iwae": iwae.run,
    "m2": m2.run,
    "cvae": cvae.run,
    "variants": variants.run,
    "pythae": pythae_side.run,
}
__all__ = ["SUITES"]
