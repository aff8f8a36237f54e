from regedu import profiles


def test_default_and_override(monkeypatch):
    monkeypatch.delenv("REGEDU_PROFILE", raising=False)
    assert profiles.get_profile().name == "cpu"  # no CUDA on the test machines
    monkeypatch.setenv("REGEDU_PROFILE", "ci")
    p = profiles.get_profile()
    assert p.name == "ci" and p.device == "cpu"
    try:
        assert profiles.set_profile("gpu").brain_shape == (160, 192, 224)
        assert profiles.get_profile().slices == (80, 96, 112)
    finally:
        profiles.set_profile(None)
    assert profiles.get_profile().name == "ci"


def test_profiles_grow():
    ci, cpu, gpu = (profiles.PROFILES[n] for n in ("ci", "cpu", "gpu"))
    assert ci.fundus_size < cpu.fundus_size < gpu.fundus_size
    assert ci.steps_2d < cpu.steps_2d and ci.steps_3d < cpu.steps_3d
    assert cpu.brain_shape == (80, 96, 112) and cpu.slices == (40, 48, 56)
