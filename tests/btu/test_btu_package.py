"""`dupfast.btu` is importable lazily: `import dupfast` alone stays light."""
import subprocess
import sys


def test_btu_is_a_lazy_submodule():
    code = ("import sys, dupfast; assert 'torch' not in sys.modules, 'import dupfast pulled in torch'; "
            "b = dupfast.btu; assert callable(b.train) and callable(b.expose); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_unknown_attribute_still_raises():
    import dupfast
    try:
        dupfast.no_such_thing
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("dupfast.no_such_thing did not raise AttributeError")
