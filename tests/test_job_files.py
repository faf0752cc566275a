"""Job files on the client side: specs, input images and latents, outputs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from google.protobuf import json_format
from PIL import Image
from safetensors.torch import save_file

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2
from services.common.errors import InvalidArgument
from services.common.job_files import (
    OUTPUT_FORMATS,
    input_kind,
    load_spec,
    read_image_file,
    spec_to_yaml,
    write_output,
)
from services.common.job_files import read_latents_file as read_raw


def read_latents_file(path):
    """read_latents_file with the RawTensor as a torch tensor, to compare with what the test wrote."""
    raw, handle = read_raw(path)
    return raw.torch(), handle


EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
SPEC = {
    "name": "two-models",
    "seed": 42,
    "width": 64,
    "height": 64,
    "inputs": [{"name": "init", "path": "init.png"}],
    "stages": [
        {"name": "base", "denoise": {"model": "tiny-sd", "prompt": "a cat", "steps": 10, "denoising_end": 0.6}},
        {"name": "refine", "denoise": {"model": "tiny-sd2", "latents": "base", "steps": 10, "denoising_start": 0.6}},
    ],
    "outputs": [{"stage": "refine", "format": "png"}, {"stage": "base", "format": "safetensors"}],
}


def png_bytes(size: tuple[int, int] = (20, 12), mode: str = "RGBA") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (10, 200, 30, 128)[: len(mode)]).save(out, format="PNG")
    return out.getvalue()


def full_handle() -> pb.LatentHandle:
    return pb.LatentHandle(
        space="sdxl",
        scaling=pb.LATENT_SCALING_RAW,
        noise=pb.NoiseLevel(fraction=0.6, cutoff_timestep=400, timestep=399.0, sigma=2.5, num_train_timesteps=1000),
        scheduler=pb.SchedulerSpec(
            class_name="EulerDiscreteScheduler",
            config_json='{"beta_start": 0.00085}',
            steps=25,
            mu=0.75,
            state=pb.BlobHandle(key="job/base/state"),
        ),
        seed=2**63 + 5,
        width=1024,
        height=768,
        model="stabilityai/stable-diffusion-xl-base-1.0",
        blob=pb.BlobHandle(key="job/base"),
    )


# --- specs ---


def test_yaml_and_json_specs_parse_to_the_same_jobspec(tmp_path: Path):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(SPEC))
    (tmp_path / "job.json").write_text(json.dumps(SPEC))
    from_yaml, from_json = load_spec(tmp_path / "job.yaml"), load_spec(str(tmp_path / "job.json"))
    assert from_yaml == from_json
    assert [s.denoise.model for s in from_yaml.stages] == ["tiny-sd", "tiny-sd2"]
    assert from_yaml.stages[1].denoise.denoising_start == 0.6
    assert [(o.stage, o.format) for o in from_yaml.outputs] == [("refine", "png"), ("base", "safetensors")]


def test_spec_to_yaml_round_trips(tmp_path: Path):
    (tmp_path / "job.yml").write_text(yaml.safe_dump(SPEC))
    spec = load_spec(tmp_path / "job.yml")
    (tmp_path / "again.yaml").write_text(spec_to_yaml(spec))
    assert load_spec(tmp_path / "again.yaml") == spec


def test_unknown_spec_field_names_the_field_and_the_file(tmp_path: Path):
    bad = {"stages": [{"name": "base", "denoise": {"stepz": 3}}]}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(InvalidArgument) as e:
        load_spec(tmp_path / "job.yaml")
    assert "job.yaml" in str(e.value) and '"stepz"' in str(e.value) and "JobSpec.stages[0].denoise" in str(e.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "", "  \n"])
def test_empty_or_non_mapping_spec_is_refused(tmp_path: Path, text: str):
    (tmp_path / "job.yaml").write_text(text)
    with pytest.raises(InvalidArgument, match=r"job\.yaml"):
        load_spec(tmp_path / "job.yaml")


def test_unparsable_json_spec_is_refused(tmp_path: Path):
    (tmp_path / "job.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match=r"job\.json: not valid json"):
        load_spec(tmp_path / "job.json")


def spec_error(tmp_path: Path, text: str, name: str = "job.yaml") -> str:
    """The message load_spec refuses `text` with."""
    (tmp_path / name).write_text(text)
    with pytest.raises(InvalidArgument) as e:
        load_spec(tmp_path / name)
    return str(e.value)


def load_text(tmp_path: Path, text: str, name: str = "job.yaml") -> jobs_pb2.JobSpec:
    (tmp_path / name).write_text(text)
    return load_spec(tmp_path / name)


STEPS_TEN = """name: job
stages:
  - name: base
    denoise:
      model: tiny-sd
      steps: ten
"""


def test_wrong_type_names_file_line_column_stage_and_field(tmp_path: Path):
    message = spec_error(tmp_path, STEPS_TEN)
    assert message.startswith(f"{tmp_path / 'job.yaml'}:6:14: stage 'base', JobSpec.stages[0].denoise.steps: ")
    assert "expected an integer (int32), got the string 'ten'" in message


def test_a_stage_without_a_name_is_named_by_its_index(tmp_path: Path):
    message = spec_error(tmp_path, "stages:\n  - decode: {latents: a}\n  - denoise:\n      steps: ten\n")
    assert "job.yaml:4:14: JobSpec.stages[1].denoise.steps: expected an integer" in message
    assert "stage '" not in message


@pytest.mark.parametrize(
    ("text", "where", "expected"),
    [
        ("width: [64]\n", "1:8: JobSpec.width", "expected an integer (int32), got a list"),
        ("width: 64.5\n", "1:8: JobSpec.width", "expected an integer (int32), got the number 64.5"),
        ("name: {a: b}\n", "1:7: JobSpec.name", "expected a string, got a mapping"),
        ("timeout_s: soon\n", "1:12: JobSpec.timeout_s", "expected a number, got the string 'soon'"),
        ("stages: {name: a}\n", "1:9: JobSpec.stages", "expected a list, each item a mapping of StageSpec fields"),
        ("stages:\n  - decode: base\n", "2:13: JobSpec.stages[0].decode", "expected a mapping of DecodeStage fields"),
        ("labels: {team: 5}\n", "1:16: JobSpec.labels['team']", "expected a string, got the number 5"),
        ("stages:\n  - denoise: {prompt: yes}\n", "2:23: JobSpec.stages[0].denoise.prompt", "the boolean yes; quote"),
        (
            "stages:\n  - denoise: {scheduler_config: [1]}\n",
            "2:33: JobSpec.stages[0].denoise.scheduler_config",
            "a mapping",
        ),
    ],
)
def test_wrong_types_say_where_and_what_is_expected(tmp_path: Path, text: str, where: str, expected: str):
    message = spec_error(tmp_path, text)
    assert f"job.yaml:{where}: " in message and expected in message


def test_unknown_top_level_key_suggests_the_closest_field(tmp_path: Path):
    message = spec_error(tmp_path, "name: job\nsed: 3\n")
    assert 'job.yaml:2:1: JobSpec.sed: unknown field "sed" of JobSpec; did you mean "seed"?' in message


def test_unknown_key_inside_a_stage_suggests_the_closest_field(tmp_path: Path):
    message = spec_error(tmp_path, "stages:\n  - name: base\n    denoise:\n      prompts: a cat\n")
    assert "job.yaml:4:7: stage 'base', JobSpec.stages[0].denoise.prompts: " in message
    assert 'unknown field "prompts" of DenoiseStage; did you mean "prompt"?' in message


def test_unknown_key_without_a_close_field_lists_the_fields(tmp_path: Path):
    message = spec_error(tmp_path, "colour: red\n")
    assert 'unknown field "colour" of JobSpec; its fields are name, seed, width, height, inputs' in message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("prompt: a cat\n", "stages[i].denoise.prompt"),
        ("negativePrompt: blurry\n", "stages[i].denoise.negative_prompt"),
        ("stages:\n  - name: base\n    steps: 3\n", "denoise.steps"),
    ],
)
def test_a_stage_kind_field_outside_its_kind_says_where_it_goes(tmp_path: Path, text: str, where: str):
    assert f"it goes in a stage's kind: {where}" in spec_error(tmp_path, text)


def test_unknown_enum_value_suggests_the_full_name(tmp_path: Path):
    message = spec_error(tmp_path, "stages:\n  - interpose: {target: sdxl, method: net}\n")
    assert "JobSpec.stages[0].interpose.method: the string 'net' is not a ConversionMethod" in message
    assert 'did you mean "CONVERSION_METHOD_NET"?' in message


def test_camel_case_names_are_accepted(tmp_path: Path):
    camel = load_text(tmp_path, "timeoutS: 30\nstages:\n  - denoise: {negativePrompt: blurry, denoisingEnd: 0.6}\n")
    snake = load_text(tmp_path, "timeout_s: 30\nstages:\n  - denoise: {negative_prompt: blurry, denoising_end: 0.6}\n")
    assert camel == snake and camel.stages[0].denoise.negative_prompt == "blurry"


def test_errors_name_fields_in_snake_case_even_when_the_file_used_camel_case(tmp_path: Path):
    message = spec_error(tmp_path, "stages:\n  - denoise:\n      negativePrompt: 5\n      denoisingEnd: late\n")
    assert "JobSpec.stages[0].denoise.negative_prompt: expected a string" in message
    assert "negativePrompt" not in message


def test_a_field_given_twice_is_refused_even_under_both_spellings(tmp_path: Path):
    message = spec_error(tmp_path, "timeout_s: 30\ntimeoutS: 60\n")
    assert "job.yaml:2:1: JobSpec.timeout_s: given twice (first at line 1)" in message


def test_two_kinds_in_one_stage_are_refused_naming_both(tmp_path: Path):
    message = spec_error(tmp_path, "stages:\n  - name: x\n    denoise: {}\n    decode: {}\n")
    assert "job.yaml:4:5: stage 'x', JobSpec.stages[0].decode: StageSpec takes one of denoise" in message
    assert "denoise is already given at line 3" in message


def test_seed_minus_one_leaves_the_job_seed_unset_for_the_gateway_to_draw(tmp_path: Path):
    spec = load_text(tmp_path, "seed: -1\nstages:\n  - denoise: {model: m}\n")
    assert not spec.HasField("seed")


@pytest.mark.parametrize("kind", ["denoise", "encode"])
def test_seed_minus_one_leaves_a_stage_seed_unset(tmp_path: Path, kind: str):
    spec = load_text(tmp_path, f"seed: 5\nstages:\n  - {kind}: {{model: m, seed: -1}}\n")
    assert spec.seed == 5 and not getattr(spec.stages[0], kind).HasField("seed")


@pytest.mark.parametrize(
    ("text", "where", "seed"),
    [
        ("seed: -2\n", "1:7: JobSpec.seed", "-2"),
        ("stages:\n  - name: a\n    denoise: {seed: -7}\n", "3:21: stage 'a', JobSpec.stages[0].denoise.seed", "-7"),
        (f"seed: {2**64}\n", "1:7: JobSpec.seed", str(2**64)),
    ],
)
def test_other_seeds_outside_uint64_are_refused_saying_minus_one_is_random(
    tmp_path: Path, text: str, where: str, seed: str
):
    message = spec_error(tmp_path, text)
    assert f"job.yaml:{where}: {seed} is not a seed: seeds are 0..2**64-1; -1 means a random seed" in message


def test_the_largest_seed_is_kept(tmp_path: Path):
    assert load_text(tmp_path, f"seed: {2**64 - 1}\n").seed == 2**64 - 1


def test_json_spec_errors_carry_the_line_and_column(tmp_path: Path):
    text = json.dumps({"name": "j", "stages": [{"name": "base", "denoise": {"steps": "ten"}}]}, indent=2)
    message = spec_error(tmp_path, text, "job.json")
    assert "job.json:7:18: stage 'base', JobSpec.stages[0].denoise.steps: expected an integer" in message


def test_json_unknown_key_is_located_and_suggested(tmp_path: Path):
    message = spec_error(tmp_path, '{"name": "j",\n "stages": [{"denoise": {"prompts": "a cat"}}]}', "job.json")
    assert 'job.json:2:26: JobSpec.stages[0].denoise.prompts: unknown field "prompts"' in message
    assert 'did you mean "prompt"?' in message


def test_errors_that_only_parse_dict_finds_still_carry_the_line(tmp_path: Path):
    text = "inputs:\n  - name: init\n    latents:\n      blob: {key: k, expires_at: tomorrow}\n"
    message = spec_error(tmp_path, text)
    assert "job.yaml:4:34: input 'init', JobSpec.inputs[0].latents.blob.expires_at: " in message


def test_yaml_anchors_and_merge_keys_still_apply(tmp_path: Path):
    text = "stages:\n  - name: a\n    denoise: &d {model: m, steps: 3}\n  - name: b\n    denoise: {<<: *d, steps: 4}\n"
    spec = load_text(tmp_path, text)
    assert [(s.denoise.model, s.denoise.steps) for s in spec.stages] == [("m", 3), ("m", 4)]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_specs_load_as_plain_parse_dict_reads_them(example: Path):
    assert load_spec(example) == json_format.ParseDict(yaml.safe_load(example.read_text()), jobs_pb2.JobSpec())


# --- latents inputs ---


def test_bare_tensor_pt_reads_as_finished_latents(tmp_path: Path):
    t = torch.randn(1, 4, 8, 8)
    torch.save(t, tmp_path / "l.pt")
    got, handle = read_latents_file(tmp_path / "l.pt")
    assert torch.equal(got, t)
    assert handle.space == "" and handle.scaling == pb.LATENT_SCALING_MODEL and handle.noise.fraction == 1.0
    assert not handle.HasField("blob")


@pytest.mark.parametrize("key", ["latents", "latent", "sample", "samples"])
def test_dict_pt_with_each_accepted_key(tmp_path: Path, key: str):
    t = torch.randn(1, 4, 8, 8)
    torch.save({key: t, "other": torch.zeros(2), "note": "hi"}, tmp_path / "l.pth")
    assert torch.equal(read_latents_file(tmp_path / "l.pth")[0], t)


def test_accepted_keys_are_tried_in_order(tmp_path: Path):
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    torch.save({"samples": b, "latent": a}, tmp_path / "l.pt")
    assert torch.equal(read_latents_file(tmp_path / "l.pt")[0], a)


@pytest.mark.parametrize("key", ["latents", "sample"])
def test_safetensors_with_accepted_key(tmp_path: Path, key: str):
    t = torch.randn(1, 16, 8, 8, dtype=torch.bfloat16)
    save_file({key: t, "extra": torch.zeros(3)}, str(tmp_path / "l.safetensors"))
    got, handle = read_latents_file(tmp_path / "l.safetensors")
    assert torch.equal(got, t) and got.dtype == torch.bfloat16
    assert handle.scaling == pb.LATENT_SCALING_MODEL and handle.noise.fraction == 1.0


@pytest.mark.parametrize("name", ["l.safetensors", "l.pt"])
def test_a_single_entry_under_any_key_is_the_latents(tmp_path: Path, name: str):
    t = torch.randn(1, 4, 8, 8)
    if name.endswith(".safetensors"):
        save_file({"x": t}, str(tmp_path / name))
    else:
        torch.save({"x": t}, tmp_path / name)
    assert torch.equal(read_latents_file(tmp_path / name)[0], t)


def test_three_dims_gain_a_batch_dim(tmp_path: Path):
    t = torch.randn(4, 8, 8)
    torch.save(t, tmp_path / "l.pt")
    got, _ = read_latents_file(tmp_path / "l.pt")
    assert got.shape == (1, 4, 8, 8) and torch.equal(got[0], t)


def test_two_unknown_keys_are_refused_listing_them(tmp_path: Path):
    save_file({"foo": torch.zeros(1, 4, 8, 8), "bar": torch.zeros(1, 4, 8, 8)}, str(tmp_path / "l.safetensors"))
    with pytest.raises(InvalidArgument) as e:
        read_latents_file(tmp_path / "l.safetensors")
    assert "'bar', 'foo'" in str(e.value) and "latents, latent, sample, samples" in str(e.value)


def test_integer_latents_are_refused(tmp_path: Path):
    torch.save(torch.zeros(1, 4, 8, 8, dtype=torch.int64), tmp_path / "l.pt")
    with pytest.raises(InvalidArgument, match=r"latents are int64"):
        read_latents_file(tmp_path / "l.pt")


def test_five_dim_latents_are_refused(tmp_path: Path):
    torch.save(torch.zeros(1, 1, 4, 8, 8), tmp_path / "l.pt")
    with pytest.raises(InvalidArgument, match=r"\[1, 1, 4, 8, 8\]"):
        read_latents_file(tmp_path / "l.pt")


class Payload:
    """Unpickling this would run arbitrary code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_never_unpickled(tmp_path: Path, capsys):
    torch.save({"latents": torch.zeros(1, 4, 8, 8), "payload": Payload()}, tmp_path / "l.pt")
    with pytest.raises(InvalidArgument, match=r"not plain tensors: torch\.load\(weights_only=True\) refused"):
        read_latents_file(tmp_path / "l.pt")
    assert "unpickled!" not in capsys.readouterr().out


def test_corrupt_latents_files_are_refused(tmp_path: Path):
    (tmp_path / "l.safetensors").write_bytes(b"garbage")
    with pytest.raises(InvalidArgument, match=r"l\.safetensors: not a readable safetensors"):
        read_latents_file(tmp_path / "l.safetensors")


# --- round trips ---


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pth"])
def test_latents_round_trip_bit_exact_with_metadata(tmp_path: Path, fmt: str):
    t = torch.randn(1, 4, 16, 12, dtype=torch.float16)
    path = write_output(tmp_path / "out" / f"l.{fmt}", latents=t, handle=full_handle())
    got, handle = read_latents_file(path)
    assert torch.equal(got, t) and got.dtype == t.dtype
    want = full_handle()
    want.ClearField("blob")
    want.scheduler.ClearField("state")
    assert handle == want


def test_pt_output_loads_with_weights_only(tmp_path: Path):
    path = write_output(tmp_path / "l.pt", latents=torch.randn(1, 4, 8, 8), handle=full_handle())
    data = torch.load(path, weights_only=True)
    assert set(data) == {"latents", "baton"} and data["baton"]["space"] == "sdxl"


def test_latents_without_handle_read_back_as_finished(tmp_path: Path):
    t = torch.randn(1, 4, 8, 8)
    path = write_output(tmp_path / "l.safetensors", latents=t)
    got, handle = read_latents_file(path)
    assert torch.equal(got, t) and handle.noise.fraction == 1.0


# --- images ---


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpg", "JPEG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_image_outputs_in_each_format(tmp_path: Path, fmt: str, pil_format: str):
    path = write_output(tmp_path / f"img.{fmt}", image_bytes=png_bytes())
    with Image.open(path) as img:
        assert img.format == pil_format and img.size == (20, 12)


def test_image_outputs_from_jpeg_bytes(tmp_path: Path):
    jpeg = io.BytesIO()
    Image.new("RGB", (9, 7), "red").save(jpeg, format="JPEG")
    path = write_output(tmp_path / "img.png", image_bytes=jpeg.getvalue())
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (9, 7)


@pytest.mark.parametrize(("fmt", "media_type"), [("png", "image/png"), ("jpg", "image/jpeg"), ("webp", "image/webp")])
def test_read_image_file_gives_the_media_type(tmp_path: Path, fmt: str, media_type: str):
    path = write_output(tmp_path / f"img.{fmt}", image_bytes=png_bytes())
    data, got = read_image_file(path)
    assert got == media_type and data == path.read_bytes()


def test_corrupt_image_is_refused(tmp_path: Path):
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InvalidArgument, match=r"img\.png: not a readable image"):
        read_image_file(tmp_path / "img.png")


def test_input_kind_by_extension():
    assert input_kind("a.PNG") == "image" and input_kind("m.webp") == "image"
    assert input_kind("l.safetensors") == "latents" and input_kind(Path("l.pth")) == "latents"
    with pytest.raises(InvalidArgument, match=r"\.gif.*accepted: \.png"):
        input_kind("a.gif")


# --- mismatches ---


def test_latents_to_an_image_format_is_refused_helpfully(tmp_path: Path):
    with pytest.raises(
        InvalidArgument, match="stage produces latents: use safetensors, pt, pth or latent, or add a decode stage"
    ):
        write_output(tmp_path / "out.png", latents=torch.zeros(1, 4, 8, 8))


def test_image_to_a_latents_format_is_refused_helpfully(tmp_path: Path):
    with pytest.raises(InvalidArgument, match="stage produces an image: use png, jpg or webp"):
        write_output(tmp_path / "out.safetensors", image_bytes=png_bytes())


def test_unknown_output_format_is_refused(tmp_path: Path):
    with pytest.raises(InvalidArgument, match="unknown output format 'gif'"):
        write_output(tmp_path / "out.gif", image_bytes=png_bytes())


def test_output_formats_name_what_each_holds():
    assert {k for k, v in OUTPUT_FORMATS.items() if v == "latents"} == {"pt", "pth", "safetensors", "latent"}
