"""The installed torch and torchaudio are one matching release and
torchaudio's compiled ops load (a mismatch fails here, loudly, with what to do)."""
import torch


def test_torchaudio_compiled_ops_load_next_to_torch():
    import dheads.model.audio  # noqa: F401 - the import guard's message names the fix
    import torchaudio
    from torchaudio._extension import _IS_TORCHAUDIO_EXT_AVAILABLE

    base = lambda v: v.split("+")[0]  # noqa: E731 - "2.11.0+cu130" -> "2.11.0"
    assert base(torchaudio.__version__) == base(torch.__version__), (
        f"torch {torch.__version__} with torchaudio {torchaudio.__version__}: "
        "reinstall from uv.lock (`make install`)")
    assert _IS_TORCHAUDIO_EXT_AVAILABLE, "libtorchaudio did not load: reinstall from uv.lock"
    # lfilter's core loop is a compiled torchaudio op on CPU
    x = torch.randn(1, 64)
    y = torchaudio.functional.lfilter(x, torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.0]),
                                      clamp=False)
    assert torch.isfinite(y).all() and y.shape == x.shape
    assert hasattr(torch.ops.torchaudio, "_lfilter_core_loop")
