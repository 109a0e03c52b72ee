"""Benchmark suites, each a function returning a pandas DataFrame.

None ships yet: the first suites (speed, mixtures, nonlinear models, VAE variants) come with their
issues. The foundation's reference run is `lvmkit train` (see README), whose results table sits
beside the published numbers.
"""

__all__: list[str] = []
