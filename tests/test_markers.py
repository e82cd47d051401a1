"""Markers say what a test needs: every test that reaches the converted base model is marked `real`,
so `-m "not real"` runs only what works without it."""

from __future__ import annotations


def test_every_test_on_the_real_base_model_is_marked_real(request):
    # fixturenames is the whole fixture closure: tiny_chat_base, base_model_dir and real_spec all
    # reach the base model through real_settings
    unmarked = [item.nodeid for item in request.session.items
                if "real_settings" in getattr(item, "fixturenames", ()) and item.get_closest_marker("real") is None]
    assert not unmarked, "mark these @pytest.mark.real (they need the converted base model):\n" + "\n".join(unmarked)
