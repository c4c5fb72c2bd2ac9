"""The exported encoders in each runtime, side by side: embedding SQNR against float32 and latency.

    python -m benchmarks runtimes DIR --images IMAGES [--num-images 2] [--threads 1 2] [--repeats 5] [--profile]
        [--reference-encoder vit_h ...] [--also OTHER_DIR ...]

DIR is a folder `python -m quantize --runtime ort openvino [executorch]` wrote (``float32/`` and ``int8/``
with ONNX files, OpenVINO IR and, where written, ExecuTorch programs), of a SAM or a SAM 2 model (whose
encoder gives three levels: their SQNR is taken together). Every encoder runs on the same images, preprocessed
for the model's family: SQNR (dB) of its embeddings against ONNX Runtime's float32 ones, and the median time
per image at each thread count, the files timed interleaved (one image through each in turn, `--repeats`
rounds) so that a busy machine slows all of them alike. OpenVINO runs with float32 inference precision, as
`quantize.openvino_runtime` ships it, and once more with OpenVINO's CPU default ("default"), which on CPUs
with bfloat16 runs the float parts in bfloat16. Returns the record (CPU model and ISA, runtime versions,
images, SQNR per encoder, median ms per encoder and thread count) and its Markdown table; the command writes
``runtimes.json`` into DIR and prints the table. ``--also`` adds the INT8 encoders of other exports of the
same model (``--no-twin``, another calibration) to the same rounds. With ``--profile``, each runtime's
profiler then times every op of each encoder as shipped (ExecuTorch: each XNNPACK operator, from ETDump) at the
first thread count, after the timing, so that profiling costs the timed runs
nothing (`benchmarks.op_profile`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.op_profile import executorch_op_times, openvino_op_times, ort_op_times, profile_table, summarize
from benchmarks.records import cpu_isa, cpu_name
from benchmarks.runs import PAIR_FILES
from quantize.fidelity import sqnr_db
from quantize.onnx_runtime import open_session
from quantize.openvino_runtime import compile_model, require_openvino, run_model
from student_models import build_sam
from student_models.device import torch_threads
from student_models.families import family_named, family_of_graph
from student_models.preprocessing import list_image_files, load_image

# The runtimes (by --runtime choice) whose encoder files a folder may hold beside encoder.onnx, and their names.
OPTIONAL_ENCODERS = {choice: encoder for runtime, (encoder, _, _, choice) in PAIR_FILES.items() if choice != "ort"}


def _encoders(folder: Path, others: list[Path]) -> list[tuple[str, str, Path]]:
    """(name, runtime, file) of every encoder to run: `folder`'s float32 and INT8 ones, and the INT8 ones of
    `others` (the same model exported otherwise), named "<runtime> int8 (<folder name>)"."""
    encoders = []
    for source, precisions in ((folder, ("float32", "int8")), *((other, ("int8",)) for other in others)):
        label = f" ({source.name})" if source != folder else ""
        for precision in precisions:
            encoders.append((f"ort {precision}{label}", "ort", source / precision / "encoder.onnx"))
            for runtime, file in OPTIONAL_ENCODERS.items():
                if (source / precision / file).is_file():
                    encoders.append((f"{runtime} {precision}{label}", runtime, source / precision / file))
    return encoders


def _flat(levels: list[np.ndarray]) -> np.ndarray:
    """An encoder's outputs as one vector (SAM 2's three levels one after the other)."""
    return np.concatenate([level.ravel() for level in levels])


def _openvino_levels(model, image: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
    """The outputs `names` of one run of an OpenVINO encoder."""
    outputs = run_model(model, {"image": image})
    return [outputs[name] for name in names]


def _runners(
    encoders: list[tuple[str, str, Path]], threads: int, folder: Path, names: tuple[str, ...]
) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """name -> run(image) -> the encoder's outputs `names` as one vector, for each encoder; `folder`'s OpenVINO
    IR also at OpenVINO's default inference precision ("<name> (default)")."""
    runners = {}
    for name, runtime, path in encoders:
        if runtime == "ort":
            session = open_session(path, threads)
            runners[name] = lambda x, s=session: _flat(s.run(list(names), {"image": x}))
            continue
        if runtime == "executorch":  # the program's outputs are the family's levels in order
            from quantize.executorch_runtime import load_program, run_program

            program = load_program(path, threads)
            runners[name] = lambda x, m=program: _flat(run_program(m, (torch.from_numpy(x),)))
            continue
        for suffix, config in (("", None), (" (default)", {})) if path.parents[1] == folder else (("", None),):
            model = compile_model(path, threads, config)
            runners[name + suffix] = lambda x, m=model: _flat(_openvino_levels(m, x, names))
    return runners


def _profiles(encoders: list[tuple[str, str, Path]], images: list[np.ndarray], threads: int) -> dict[str, dict]:
    """`benchmarks.op_profile`'s summary for each encoder file as shipped."""
    op_times = {"ort": ort_op_times, "openvino": openvino_op_times, "executorch": executorch_op_times}
    return {name: summarize(op_times[runtime](path, images, threads)) for name, runtime, path in encoders}


def compare_runtimes(
    folder: str | Path,
    images_dir: str | Path,
    num_images: int = 2,
    threads: tuple[int, ...] = (1, 2),
    repeats: int = 5,
    profile: bool = False,
    reference_encoders: tuple[str, ...] = (),
    others: tuple[str | Path, ...] = (),
) -> tuple[dict, str]:
    """(record, Markdown table) for the encoders under `folder` on the first `num_images` of `images_dir`.

    `others`: folders of the same model exported otherwise (e.g. with ``--no-twin``), whose INT8 encoders
    join the same interleaved rounds.

    `reference_encoders`: registered models (e.g. "vit_h", or "sam2.1_hiera_tiny" and "sam2.1_hiera_large", random
    weights) whose PyTorch float32 image encoders (SAM 2: ``forward_image`` and the two 1x1 convolutions, as
    `TorchSam2Backend.encode`) are each timed on the first image once per thread count, halfway through the
    interleaved rounds, so that each encoder's speed-up over them is measured in the same run.
    """
    folder, others = Path(folder), [Path(other) for other in others]
    encoders = _encoders(folder, others)
    missing = [str(path) for _, _, path in encoders if not path.is_file()]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} not found: give the output folder of python -m quantize (with its ONNX export, "
            "and --runtime ort openvino for the OpenVINO rows)"
        )
    files = list_image_files(images_dir)[:num_images]
    if not files:
        raise ValueError(f"no images in {images_dir}: give a folder of held-out images with --images")
    family = family_of_graph(
        [output.name for output in open_session(folder / "float32" / "encoder.onnx").get_outputs()]
    )
    images = [family.prepare(load_image(path))[0].numpy() for path in files]
    record = {
        "folder": str(folder), "others": [str(o) for o in others], "images": [p.name for p in files],
        "cpu": cpu_name(), "isa": cpu_isa(),
        "onnxruntime": ort.__version__, "openvino": require_openvino(), "sqnr_db": {}, "median_ms": {},
    }  # fmt: skip
    if any(runtime == "executorch" for _, runtime, _ in encoders):
        from quantize.executorch_runtime import require_executorch

        record["executorch"] = require_executorch()
    pytorch_encoders = {model: _reference_encoder(model) for model in reference_encoders}
    record["references"] = [{"model": model, "runtime": "pytorch float32", "ms": {}} for model in reference_encoders]
    for count in threads:
        runners = _runners(encoders, count, folder, family.embedding_names)
        outputs = {name: [run(x) for x in images] for name, run in runners.items()}  # also the warm-up
        if not record["sqnr_db"]:
            reference = outputs["ort float32"]
            record["sqnr_db"] = {
                name: round(float(np.mean([sqnr_db(r, o) for o, r in zip(outs, reference, strict=True)])), 2)
                for name, outs in outputs.items()
                if name != "ort float32"
            }
        times: dict[str, list[float]] = {name: [] for name in runners}
        for round_ in range(repeats):
            if round_ == repeats // 2:
                for reference in record["references"]:
                    ms = _time_torch(pytorch_encoders[reference["model"]], images[0], count)
                    reference["ms"][str(count)] = round(ms, 1)
            for x in images:
                for name, run in runners.items():
                    start = time.perf_counter()
                    run(x)
                    times[name].append((time.perf_counter() - start) * 1e3)
        record["median_ms"][str(count)] = {name: round(float(np.median(t)), 1) for name, t in times.items()}
    if not profile:
        return record, _table(record)
    record["profile_threads"] = threads[0]
    record["profile"] = _profiles(encoders, images, threads[0])
    return record, f"{_table(record)}\n\nProfile at {threads[0]} thread(s):\n\n{profile_table(record['profile'])}"


def _reference_encoder(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    encoder, _ = family_named(model).networks(build_sam(model).eval())
    return encoder


@torch.no_grad()
def _time_torch(encoder: torch.nn.Module, image: np.ndarray, threads: int) -> float:
    """ms of one call of a PyTorch encoder at `threads` threads (one call: a vit_h encoder takes a minute)."""
    with torch_threads(threads):
        start = time.perf_counter()
        encoder(torch.from_numpy(image))
        return (time.perf_counter() - start) * 1e3


def _table(record: dict) -> str:
    timed = record["median_ms"]
    references = record.get("references", [])
    header = "| encoder | SQNR vs ORT float32 (dB) | " + " | ".join(f"{t} thr: ms (ORT fp32 / it)" for t in timed)
    for reference in references:
        header += " | " + " | ".join(f"{t} thr: {reference['model']} / it" for t in timed)
    lines = [header + " |", "|" + "---|" * (2 + len(timed) * (1 + len(references)))]
    for name in next(iter(timed.values())):
        cells = [f"{timed[t][name]} ({timed[t]['ort float32'] / timed[t][name]:.2f}x)" for t in timed]
        for reference in references:
            cells += [f"{reference['ms'][t] / timed[t][name]:.1f}x" for t in timed]
        lines.append(f"| {name} | {record['sqnr_db'].get(name, '-')} | " + " | ".join(cells) + " |")
    if references:
        lines.append("")
    for reference in references:
        ms = ", ".join(f"{reference['ms'][t]:.0f} ms at {t} thread(s)" for t in timed)
        lines.append(f"{reference['model']} (PyTorch float32, random weights, one call per thread count): {ms}.")
    return "\n".join(lines)
