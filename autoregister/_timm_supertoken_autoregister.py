"""Registers timm-supertoken's models the moment timm is imported (loaded at start-up by a .pth file).

It lets `timm.create_model('vit_small_stconv')` work in scripts that never import the plugin, such as
timm's own train.py or transformers' TimmWrapper. Start-up cost is one tiny stdlib-only module and a finder
on `sys.meta_path`; torch and the plugin are only imported after the program itself imports timm.
Set TIMM_SUPERTOKEN_NO_AUTOREGISTER=1 to turn it off: nothing is registered then, and creating one of our
models before `import timm_supertoken` fails with a line saying so, instead of timm's bare "Unknown model"
(which transformers rewords as "upgrade timm").
"""
import os
import sys

OPT_OUT_ENV = 'TIMM_SUPERTOKEN_NO_AUTOREGISTER'
# the names timm_supertoken registers (a test holds this to its registry); spelt out to stay stdlib-only
MODEL_NAMES = tuple(f'vit_{size}_{embed}' for size in ('tiny', 'small', 'base')
                    for embed in ('patch', 'convembed', 'stconv'))
_UNKNOWN_MODEL = ('Unknown model (', ')')  # timm's message, around the name


def _register(timm_module) -> None:  # noqa: ARG001 (the finder passes the loaded module)
    """Import the plugin, whose import registers the models."""
    try:
        import timm_supertoken  # noqa: F401
    except Exception as error:  # a broken plugin must never break `import timm`
        import warnings

        warnings.warn(f'timm-supertoken could not register its models: {error!r}', RuntimeWarning)


def _explain_unregistered(timm_module) -> None:
    """Wrap timm.create_model so that asking for one of our unregistered models names the import it needs."""
    create_model = timm_module.create_model

    def create_model_or_explain(model_name, *args, **kwargs):
        try:
            return create_model(model_name, *args, **kwargs)
        except RuntimeError as error:
            message, (head, tail) = str(error), _UNKNOWN_MODEL
            name = message[len(head):-len(tail)] if message.startswith(head) and message.endswith(tail) else None
            if name not in MODEL_NAMES:
                raise
            raise RuntimeError(f'{name} is a timm-supertoken model, not registered because {OPT_OUT_ENV} is set: '
                               f'`import timm_supertoken` before creating it') from None

    create_model_or_explain.__doc__ = create_model.__doc__
    create_model_or_explain.__wrapped__ = create_model
    timm_module.create_model = create_model_or_explain


class _AfterTimmImport:
    """A meta-path finder that lets the normal finders locate timm, then runs `then(timm)` once it is loaded.

    It stays on sys.meta_path until timm is executed: a probe such as `importlib.util.find_spec('timm')`
    (transformers' is_timm_available) also asks the finders, and the import that follows must be seen too.
    """

    def __init__(self, then) -> None:
        self.then = then
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm' or self._searching:
            return None
        import importlib.util

        self._searching = True  # let the other finders answer the lookup below
        try:
            spec = importlib.util.find_spec('timm')
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            exec_timm(module)
            self.then(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Put the finder on sys.meta_path unless timm is already imported; opted out, it only explains."""
    opted_out = os.environ.get(OPT_OUT_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on')
    if 'timm' in sys.modules or any(isinstance(f, _AfterTimmImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _AfterTimmImport(_explain_unregistered if opted_out else _register))
