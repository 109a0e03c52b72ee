"""The public names of lvmkit: the one list. Type checkers and editors read it as a stub;
``lvmkit/__init__.py`` reads it at run time (``lazy_loader.attach_stub``) and imports each name
when it is first used."""

from . import (
    benchmarks as benchmarks,
    cli as cli,
    data as data,
    datasets as datasets,
    estimators as estimators,
    guides as guides,
    inference as inference,
    models as models,
    music as music,
    pairs as pairs,
    plots as plots,
    runs as runs,
)
from .data import (
    Dataset as Dataset,
    binarize as binarize,
    load_mnist as load_mnist,
)
from .estimators import (
    GaussianMixture as GaussianMixture,
)
from .guides import (
    CategoricalEncoder as CategoricalEncoder,
    CategoricalEncoderConfig as CategoricalEncoderConfig,
    ConditionalEncoder as ConditionalEncoder,
    DeterministicEncoder as DeterministicEncoder,
    GaussianEncoder as GaussianEncoder,
    GaussianEncoderConfig as GaussianEncoderConfig,
    IAFEncoder as IAFEncoder,
    MarkovGuide as MarkovGuide,
    RecurrentEncoder as RecurrentEncoder,
    SemiSupervisedEncoder as SemiSupervisedEncoder,
    StackedSemiSupervisedEncoder as StackedSemiSupervisedEncoder,
    VQEncoder as VQEncoder,
)
from .inference import (
    CIWAE as CIWAE,
    IWAE as IWAE,
    MIWAE as MIWAE,
    OBJECTIVES as OBJECTIVES,
    PIWAE as PIWAE,
    ActiveUnits as ActiveUnits,
    Callback as Callback,
    EarlyStopping as EarlyStopping,
    EvaluationSummary as EvaluationSummary,
    FitInfo as FitInfo,
    FitResult as FitResult,
    Interleaved as Interleaved,
    KLSchedule as KLSchedule,
    MLflowLogger as MLflowLogger,
    NonFiniteLossError as NonFiniteLossError,
    ReweightedWakeSleep as ReweightedWakeSleep,
    Source as Source,
    TensorBoardLogger as TensorBoardLogger,
    active_units as active_units,
    bdmc as bdmc,
    evaluate as evaluate,
    fit as fit,
    gap_split as gap_split,
    log_weights as log_weights,
    posterior_means as posterior_means,
    reconstruction_error as reconstruction_error,
    summarize as summarize,
    to_inference_data as to_inference_data,
)
from .inference.checkpoint import (
    CheckpointError as CheckpointError,
)
from .models import (
    CVAE as CVAE,
    LIKELIHOODS as LIKELIHOODS,
    M2 as M2,
    VAE as VAE,
    VQVAE as VQVAE,
    Autoencoder as Autoencoder,
    AutoencoderConfig as AutoencoderConfig,
    ConditionalBaseline as ConditionalBaseline,
    CVAEConfig as CVAEConfig,
    DeepMarkovModel as DeepMarkovModel,
    DMMConfig as DMMConfig,
    GMMConfig as GMMConfig,
    M2Config as M2Config,
    NonlinearConfig as NonlinearConfig,
    NonlinearLVM as NonlinearLVM,
    RecurrentVAE as RecurrentVAE,
    RecurrentVAEConfig as RecurrentVAEConfig,
    StackedM2 as StackedM2,
    VAEConfig as VAEConfig,
    VQVAEConfig as VQVAEConfig,
    exact_log_likelihood as exact_log_likelihood,
    kingma_aux_weight as kingma_aux_weight,
)
from .pairs import (
    build_autoencoder as build_autoencoder,
    build_cvae as build_cvae,
    build_dmm as build_dmm,
    build_iaf_vae as build_iaf_vae,
    build_m1_m2 as build_m1_m2,
    build_m2 as build_m2,
    build_nonlinear as build_nonlinear,
    build_recurrent_vae as build_recurrent_vae,
    build_vae as build_vae,
    build_vamp_vae as build_vamp_vae,
    build_vqvae as build_vqvae,
    fit_code_prior as fit_code_prior,
)

__version__: str
