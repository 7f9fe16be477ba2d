"""Registers timm-supertoken's models the moment timm is imported (loaded at start-up by a .pth file).

It lets `timm.create_model('vit_small_stconv')` work in scripts that never import the plugin, such as
timm's own train.py. Start-up cost is one tiny stdlib-only module and a finder on `sys.meta_path`;
torch and the plugin are only imported after the program itself imports timm.
Set TIMM_SUPERTOKEN_NO_AUTOREGISTER=1 to turn it off.
"""
import os
import sys

OPT_OUT_ENV = 'TIMM_SUPERTOKEN_NO_AUTOREGISTER'


class _RegisterAfterTimmImport:
    """A meta-path finder that lets the normal finders locate timm, then wraps its loader."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'timm':
            return None
        sys.meta_path.remove(self)  # one-shot; also keeps the lookup below from finding us again
        import importlib.util

        spec = importlib.util.find_spec('timm')
        if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module):
            exec_timm(module)
            try:
                import timm_supertoken  # noqa: F401  (registers the models)
            except Exception as error:  # a broken plugin must never break `import timm`
                import warnings

                warnings.warn(f'timm-supertoken could not register its models: {error!r}', RuntimeWarning)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Put the finder on sys.meta_path unless opted out or timm is already imported."""
    if os.environ.get(OPT_OUT_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on'):
        return
    if 'timm' in sys.modules or any(isinstance(f, _RegisterAfterTimmImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _RegisterAfterTimmImport())
