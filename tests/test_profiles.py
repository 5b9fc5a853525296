"""Detection profiles: the catalog's fast / balanced / thorough, a user's own, size-aware
thresholds, fusion, plates kept near vehicles, and how the options choose a profile."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from jobs.cli import build_parser, spec_fields
from jobs.spec import SpecError, build_spec
from models.catalog import load_catalog, load_profiles
from models.detections import Detections
from models.fetch import prepared_weights
from models.passes import near
from models.profiles import PROFILES, ClassPlan, Profile, resolve
from operators.detect import Detector


def spec(**fields):
    return build_spec({"inputs": ["in"], "output": "out", **fields})


def test_builtin_profiles_cover_every_class_with_catalog_models():
    profiles, catalog = load_profiles(), load_catalog()
    assert set(PROFILES) <= set(profiles)
    for name in PROFILES:
        resolved = resolve(profiles[name], catalog)
        assert set(resolved.classes) == {"face", "license_plate", "person", "vehicle"}, name
        assert all(m.model in catalog for p in resolved.classes.values() for m in p.members)


def test_size_rules_pick_the_first_rule_whose_bound_exceeds_the_box():
    plan = ClassPlan(members=[{"model": "centerface"}],
                     thresholds=[{"below": 20, "score": 0.3}, {"below": 64, "score": 0.1}, {"score": 0.05}])
    assert plan.threshold_for(np.array([5, 19.9, 20, 63, 64, 500])).tolist() == pytest.approx(
        [0.3, 0.3, 0.1, 0.1, 0.05, 0.05])
    assert plan.uniform(0.4).threshold_for(np.array([5, 500])).tolist() == pytest.approx([0.4, 0.4])
    for bad in ([{"score": 0.2}, {"score": 0.1}], [{"below": 64, "score": 0.2}, {"below": 20, "score": 0.1},
                                                  {"score": 0.1}], [{"below": 20, "score": 0.2}]):
        with pytest.raises(ValueError, match="thresholds"):
            ClassPlan(members=[{"model": "centerface"}], thresholds=bad)


def test_members_inherit_the_catalog_passes_and_crops_need_a_vehicle_plan():
    catalog = load_catalog()
    balanced = resolve(load_profiles()["balanced"], catalog)
    platedet = balanced.classes["license_plate"].members[0]
    assert platedet.model == "platedet" and platedet.vehicle_crops and platedet.tiling == "off"
    assert not any(m.vehicle_crops for m in balanced.classes["face"].members)
    with pytest.raises(ValueError, match="vehicle"):
        resolve(Profile(name="x", classes={"license_plate": {"members": [{"model": "platedet"}],
                                                             "thresholds": [{"score": 0.5}]}}), catalog)


def test_options_choose_the_profile_and_refuse_what_cannot_run():
    assert spec().detection_profile().name == "balanced"
    fast = spec(profile="fast")
    assert fast.resolve_models()[1].keys() == {"centerface-int8", "platedet"}
    # an explicit threshold replaces the size rules of that class only
    given = spec(face_threshold=0.35).detection_profile()
    assert [t.score for t in given.classes["face"].thresholds] == [0.35]
    assert len(given.classes["license_plate"].thresholds) == len(
        spec().detection_profile().classes["license_plate"].thresholds)
    with pytest.raises(SpecError, match="profile: unknown profile 'best'; choose from"):
        spec(profile="best").resolve_models()
    with pytest.raises(SpecError, match="profile, detect-models"):
        spec(profile="fast", detect_models="centerface").resolve_models()
    args = build_parser().parse_args(["run", "in", "out", "--profile", "thorough"])
    assert spec_fields(args, ["in"], "out")["profile"] == "thorough"


def test_a_users_catalog_file_adds_a_profile(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"profiles": {"faces-only": {
        "description": "two CenterFace passes, averaged",
        "classes": {"face": {"members": [{"model": "centerface"}, {"model": "centerface", "scale": 2}],
                             "fusion": "mean", "thresholds": [{"score": 0.3}]}}}}}))
    job = spec(models=str(path), profile="faces-only")
    assert job.resolve_models() == (["face"], {"centerface": load_catalog()["centerface"]})
    with pytest.raises(SpecError, match="license-plate: no model of profile faces-only"):
        spec(models=str(path), profile="faces-only", license_plate=True).resolve_models()
    path.write_text(yaml.safe_dump({"profiles": {"bad": {"classes": {"face": {
        "members": [{"model": "nosuch"}], "thresholds": [{"score": 0.3}]}}}}}))
    with pytest.raises(SpecError, match="unknown model"):
        spec(models=str(path), profile="bad").resolve_models()


def test_near_keeps_boxes_centred_in_a_grown_vehicle():
    vehicles = Detections([[100, 100, 200, 160]], [0.9], [3])
    plates = Detections([[140, 140, 160, 150], [205, 120, 215, 125], [400, 400, 420, 410]], [0.6, 0.6, 0.6],
                        [1, 1, 1])
    assert near(plates, vehicles, 0.0).boxes[:, 0].tolist() == [140]
    assert near(plates, vehicles, 0.1).boxes[:, 0].tolist() == [140, 205]
    assert len(near(plates, Detections.empty(), 0.5)) == 0


def test_size_thresholds_count_stored_pixels(labelled_rgb):
    """A face found on a detection copy scaled down 4x is judged by its size in the stored image:
    with a rule that refuses boxes under 40 px, the copy's 15 px faces are kept when they stand
    for 60 px ones."""
    catalog = load_catalog()
    entry = catalog["centerface"]
    profile = Profile(name="t", classes={"face": {"members": [{"model": "centerface"}],
                                                  "thresholds": [{"below": 40, "score": 1.0}, {"score": 0.3}]}})
    det = Detector([(entry.model_dump(), prepared_weights(entry))], ["face"], resolve(profile, catalog).model_dump(),
                   "cpu", 2)
    image = labelled_rgb("faces", 1)[0]
    small = image[::4, ::4].copy()
    as_copy = det.detect([small], stored_scales=[4.0])[0]
    as_stored = det.detect([small], stored_scales=[1.0])[0]
    sizes = np.maximum(as_copy.boxes[:, 2] - as_copy.boxes[:, 0], as_copy.boxes[:, 3] - as_copy.boxes[:, 1])
    assert len(as_copy) >= 3 and (sizes < 40).all()
    assert len(as_stored) == 0


def test_mean_fusion_dilutes_a_member_that_alone_finds_a_box(labelled_rgb):
    """Two members, one of which barely sees the faces (a quarter scale): with `mean` the faces
    score the average of both members (lower), with `union` the better member's score."""
    catalog = load_catalog()
    entry = catalog["centerface"]
    members = [{"model": "centerface"}, {"model": "centerface", "scale": 0.25}]
    image = labelled_rgb("faces", 1)[0]
    found = {}
    for fusion in ("mean", "union"):
        profile = resolve(Profile(name=fusion, classes={"face": {"members": members, "fusion": fusion,
                                                                 "thresholds": [{"score": 0.05}]}}), catalog)
        det = Detector([(entry.model_dump(), prepared_weights(entry))], ["face"], profile.model_dump(), "cpu", 2)
        found[fusion] = det.detect([image])[0]
    assert len(found["union"]) >= 3
    assert found["mean"].scores.max() < found["union"].scores.max() - 0.1
