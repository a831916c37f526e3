"""build(spec) accepts the contract's shapes and rejects everything else with a field-named error."""

import pytest
import torch

import nfcore
from nfcore import SpecError


def test_design_example_builds():
    spec = {"dim": 2, "context_dim": 0, "dtype": "float32",
            "base": {"type": "normal"},
            "layers": [{"type": "standardize"},
                       {"type": "nsf_coupling", "bins": 8, "hidden": [64, 64], "bound": 5.0},
                       {"type": "permute", "kind": "reverse"},
                       {"type": "maf", "hidden": [64, 64]}]}
    flow = nfcore.build(spec)
    assert [layer["type"] for layer in flow.spec["layers"]] == [
        "standardize", "nsf_coupling", "permute", "maf"]
    assert flow.spec["layers"][3]["scale_bound"] == 6.0  # defaults are filled in


@pytest.mark.parametrize("preset,layer", [("planar", "planar"), ("radial", "radial"),
                                          ("realnvp", "affine_coupling"), ("maf", "maf"),
                                          ("iaf", "iaf"), ("nsf", "nsf_coupling"),
                                          ("nsf_ar", "nsf_ar")])
def test_presets_expand_to_their_layers(preset, layer):
    flow = nfcore.build({"preset": preset, "dim": 2, "transforms": 4})
    kinds = [entry["type"] for entry in flow.spec["layers"]]
    assert kinds.count(layer) == 4
    assert kinds[0] == "standardize"


@pytest.mark.parametrize(("mixing", "between"), [
    ("reverse", {"type": "permute", "kind": "reverse", "seed": 0}),
    ("random", {"type": "permute", "kind": "random", "seed": 1}),
    ("lu", {"type": "lu_linear", "permutation": "random"})])
def test_preset_mixing_sets_what_goes_between_layers(mixing, between):
    spec = {"preset": "nsf_ar", "dim": 3, "transforms": 3, "mixing": mixing}
    layers = nfcore.build(spec).spec["layers"]
    assert [entry["type"] for entry in layers] == [
        "standardize", "loc_scale", "nsf_ar", between["type"], "nsf_ar", between["type"],
        "nsf_ar"]
    assert layers[3] == between
    if mixing == "random":
        assert layers[5]["seed"] == 2  # a different permutation each time
    default = nfcore.build({k: v for k, v in spec.items() if k != "mixing"}).spec
    assert (default == nfcore.build(spec).spec) == (mixing == "reverse")


def test_lu_mixing_alternates_the_order_in_two_dimensions():
    # A random order of two features is the identity half the time; the preset takes the reverse.
    for seed in range(4):
        torch.manual_seed(seed)
        flow = nfcore.build({"preset": "nsf_ar", "dim": 2, "transforms": 3, "mixing": "lu"})
        mixers = [layer for entry, layer in zip(flow.spec["layers"], flow.layers, strict=True)
                  if entry["type"] == "lu_linear"]
        assert [entry["permutation"] for entry in flow.spec["layers"]
                if entry["type"] == "lu_linear"] == ["reverse", "reverse"]
        x = torch.tensor([[1.0, 2.0]])
        assert all(torch.equal(layer(x)[0], x.flip(-1)) for layer in mixers)


@pytest.mark.parametrize(("preset", "layer"), [("nsf", "nsf_ar"), ("realnvp", "maf")])
def test_coupling_presets_in_one_dimension_take_the_autoregressive_layer_of_the_same_map(
        preset, layer):
    # One feature leaves nothing to couple on; a one-parameter model must still fit with the
    # default preset. The layer's own map is then learned outright.
    flow = nfcore.build({"preset": preset, "dim": 1, "transforms": 3, "hidden": [8],
                         "dtype": "float64"})
    kinds = [entry["type"] for entry in flow.spec["layers"]]
    assert kinds.count(layer) == 3 and not {"nsf_coupling", "affine_coupling"} & set(kinds)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))  # a map that is not the identity
        x = torch.linspace(-12, 12, 24_001, dtype=torch.float64)[:, None]
        density = flow.log_prob(x).exp()
        z, _ = flow.transform(x)
        back, _ = flow.sample_from_noise(z)
    assert abs(float(torch.trapezoid(density, x[:, 0])) - 1) < 1e-3
    assert torch.allclose(back, x, atol=1e-8)


def test_preset_applies_hyper_parameters_to_each_layer():
    flow = nfcore.build({"preset": "nsf", "dim": 3, "transforms": 2, "hidden": [8, 8], "bins": 4,
                         "bound": 3.0})
    splines = [entry for entry in flow.spec["layers"] if entry["type"] == "nsf_coupling"]
    assert all(s["bins"] == 4 and s["hidden"] == [8, 8] and s["bound"] == 3.0 for s in splines)


def test_normalized_spec_rebuilds_the_same_architecture():
    flow = nfcore.build({"preset": "maf", "dim": 3})
    again = nfcore.build(flow.spec)
    assert again.spec == flow.spec
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in flow.state_dict().items()}


@pytest.mark.parametrize("spec,field", [
    ({"layers": [{"type": "maf"}]}, "dim"),
    ({"dim": 0, "layers": [{"type": "maf"}]}, "dim"),
    ({"dim": True, "layers": [{"type": "maf"}]}, "dim"),
    ({"dim": 2, "layers": []}, "layers"),
    ({"dim": 2}, "layers"),
    ({"dim": 2, "layers": [{"type": "glow"}]}, "layers[0].type"),
    ({"dim": 2, "layers": [{"hidden": [3]}]}, "layers[0].type"),
    ({"dim": 2, "layers": [{"type": "maf", "hiden": [3]}]}, "layers[0].hiden"),
    ({"dim": 2, "layers": [{"type": "maf", "hidden": [0]}]}, "layers[0].hidden[0]"),
    ({"dim": 2, "layers": [{"type": "maf", "hidden": "64"}]}, "layers[0].hidden"),
    ({"dim": 2, "layers": [{"type": "nsf_coupling", "bins": 1}]}, "layers[0].bins"),
    ({"dim": 2, "layers": [{"type": "nsf_ar", "bound": -1.0}]}, "layers[0].bound"),
    ({"dim": 2, "layers": [{"type": "nsf_ar", "bound": float("nan")}]}, "layers[0].bound"),
    ({"dim": 2, "layers": [{"type": "maf", "activation": "sigmoid"}]}, "layers[0].activation"),
    ({"dim": 2, "layers": [{"type": "permute", "kind": "shuffle"}]}, "layers[0].kind"),
    ({"dim": 1, "layers": [{"type": "affine_coupling"}]}, "layers[0].type"),
    ({"dim": 2, "dtype": "float16", "layers": [{"type": "maf"}]}, "dtype"),
    ({"dim": 2, "base": {"type": "student"}, "layers": [{"type": "maf"}]}, "base.type"),
    ({"dim": 2, "colour": "red", "layers": [{"type": "maf"}]}, "colour"),
    ({"dim": 2, "context_dim": 2, "layers": [{"type": "actnorm"}]}, "context_dim"),
    ({"dim": 2, "layers": [{"type": "planar", "hidden": [8]}]}, "layers[0].hidden"),
    ({"dim": 2, "context_dim": 1, "layers": [{"type": "radial", "hidden": [0]}]},
     "layers[0].hidden[0]"),
    ({"preset": "glow", "dim": 2}, "preset"),
    ({"preset": "maf", "dim": 2, "bins": 8}, "bins"),
    ({"preset": "nsf", "dim": 2, "transforms": 0}, "transforms"),
    ({"preset": "nsf", "dim": 2, "standardize": "yes"}, "standardize"),
    ({"preset": "nsf", "dim": 2, "layers": [{"type": "maf"}]}, "layers"),
    ({"preset": "nsf_ar", "dim": 2, "mixing": "shuffle"}, "mixing"),
    ({"preset": "planar", "dim": 2, "mixing": "lu"}, "mixing"),
    ({"dim": 2, "layers": [{"type": "lu_linear", "permutation": "cyclic"}]},
     "layers[0].permutation"),
    ({"dim": 2, "layers": [{"type": "maf", "hidden": [10**6]}]}, "layers[0].hidden[0]"),
    ({"dim": 2, "layers": [{"type": "planar"}] * 1000}, "layers"),
    ([1, 2], ""),
])
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(SpecError) as info:
        nfcore.build(spec)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_spec_error_is_a_value_error():
    with pytest.raises(ValueError):
        nfcore.build({"dim": -3, "layers": [{"type": "maf"}]})


@pytest.mark.parametrize(("preset", "expected"), [
    ("resflow", ["standardize", "loc_scale", "actnorm", "residual", "actnorm", "residual"]),
    ("sylvester", ["standardize", "loc_scale", "sylvester", "sylvester"]),
    ("cnf", ["standardize", "loc_scale", "cnf"])])
def test_new_presets_expand_and_take_their_layers_hyper_parameters(preset, expected):
    params = {"resflow": {"lipschitz": 0.9, "exact_dim": 4, "hidden": [8]},
              "sylvester": {"kind": "householder", "reflections": 2},
              "cnf": {"rtol": 1e-6, "atol": 1e-7, "method": "dopri8", "hidden": [8]}}[preset]
    spec = {"preset": preset, "dim": 2, **params}
    if preset != "cnf":
        spec["transforms"] = 2
    layers = nfcore.normalize_spec(spec)["layers"]
    assert [layer["type"] for layer in layers] == expected
    for layer in layers:
        if layer["type"] == expected[-1]:
            assert {k: layer[k] for k in params} == params


@pytest.mark.parametrize(("layer", "field"), [
    ({"type": "residual", "lipschitz": 1.0}, "layers[0].lipschitz"),
    ({"type": "residual", "lipschitz": 0}, "layers[0].lipschitz"),
    ({"type": "residual", "exact_dim": -1}, "layers[0].exact_dim"),
    ({"type": "cnf", "rtol": 0}, "layers[0].rtol"),
    ({"type": "cnf", "method": "euler"}, "layers[0].method"),
    ({"type": "sylvester", "kind": "cayley"}, "layers[0].kind"),
    ({"type": "cnf", "steps": 4}, "layers[0].steps")])
def test_new_layers_reject_bad_hyper_parameters_by_name(layer, field):
    with pytest.raises(SpecError) as e:
        nfcore.build({"dim": 2, "layers": [layer]})
    assert e.value.field == field
