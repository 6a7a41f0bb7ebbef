"""World matrices as files: ITK transform files (SimpleITK, ANTs, 3D Slicer) and JSON/text.

ITK works in LPS millimetres (``p_LPS = F p_RAS``, ``F = diag(-1, -1, 1)``) and, like our
world matrices, its registration transforms map *fixed* points to *moving* points (the image
is resampled as ``moving(T(p))``). A RAS+ world matrix ``M = [A | b]`` is therefore the ITK
``AffineTransform_double_3_3`` with matrix ``F A F``, translation ``F b`` and centre 0:
``Parameters`` = the 9 matrix entries row by row, then the 3 translations;
``FixedParameters`` = the centre ``0 0 0``. Reading accepts a centre ``c`` (``T(p) =
A (p - c) + c + t``) and the ``MatrixOffsetTransformBase`` / float variants.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from voxelopt.affine.geometry import check_matrix

__all__ = [
    "ITK_TRANSFORM_TYPE",
    "read_itk_transform",
    "read_world_matrix",
    "write_itk_transform",
    "write_world_matrix",
]

ITK_TRANSFORM_TYPE = "AffineTransform_double_3_3"
_READABLE = {
    f"{kind}_{real}_3_3"
    for kind in ("AffineTransform", "MatrixOffsetTransformBase")
    for real in ("double", "float")
}
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, its own inverse

#: what the world-matrix files say about themselves
MATRIX_CONVENTION = (
    "RAS+ mm, fixed world -> moving world: the fixed-space point p corresponds to the "
    "moving-space point matrix @ [p, 1] (the aligned moving image is moving(matrix @ p))"
)


def _atomic_write(path: Path, text: str) -> Path:
    from voxelopt.io import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return path


def write_itk_transform(path, matrix) -> Path:
    """Write a world matrix as an ITK text transform file (``.tfm`` or ``.txt``).

    Args:
        path: destination; its folder must exist (written atomically).
        matrix: ``(4, 4)`` RAS+ world matrix (fixed world -> moving world, mm).

    Returns:
        The written path.
    """
    m = _FLIP @ check_matrix(matrix) @ _FLIP
    params = " ".join(repr(float(v)) for v in [*m[:3, :3].ravel(), *m[:3, 3]])
    text = (
        "#Insight Transform File V1.0\n"
        "#Transform 0\n"
        f"Transform: {ITK_TRANSFORM_TYPE}\n"
        f"Parameters: {params}\n"
        "FixedParameters: 0 0 0\n"
    )
    return _atomic_write(Path(path), text)


def _fields(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"ITK transform file not found: {path}")
    lines = path.read_text(errors="replace").splitlines()
    if not lines or not lines[0].startswith("#Insight Transform File"):
        raise ValueError(f"{path} is not an ITK text transform file (no '#Insight Transform File')")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            if key.strip() in fields:
                raise ValueError(f"{path} holds more than one transform; only one is supported")
            fields[key.strip()] = value.strip()
    return fields


def read_itk_transform(path) -> np.ndarray:
    """Read an ITK text affine transform file back into a RAS+ world matrix.

    Args:
        path: ``.tfm``/``.txt`` file holding one ``AffineTransform`` or
            ``MatrixOffsetTransformBase`` (double or float, 3-D).

    Returns:
        ``(4, 4)`` float64 world matrix (fixed world -> moving world, RAS+ mm).
    """
    path = Path(path)
    fields = _fields(path)
    kind = fields.get("Transform")
    if kind not in _READABLE:
        raise ValueError(f"{path}: transform type {kind!r} is not one of {sorted(_READABLE)}")
    try:
        params = np.array(fields["Parameters"].split(), dtype=np.float64)
        centre = np.array(fields.get("FixedParameters", "0 0 0").split(), dtype=np.float64)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable Parameters/FixedParameters ({exc})") from None
    if params.shape != (12,) or centre.shape != (3,):
        raise ValueError(
            f"{path}: expected 12 Parameters and 3 FixedParameters, got "
            f"{params.size} and {centre.size}"
        )
    a, t = params[:9].reshape(3, 3), params[9:]
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = t + centre - a @ centre
    return check_matrix(_FLIP @ lps @ _FLIP, f"the transform in {path}")


def write_world_matrix(path, matrix) -> Path:
    """Write a world matrix as JSON (``.json``: matrix and convention) or plain text (else).

    Args:
        path: destination; its folder must exist (written atomically).
        matrix: ``(4, 4)`` RAS+ world matrix.

    Returns:
        The written path.
    """
    m = check_matrix(matrix)
    path = Path(path)
    if path.suffix.lower() == ".json":
        text = json.dumps({"matrix": m.tolist(), "convention": MATRIX_CONVENTION}, indent=2)
    else:
        rows = "\n".join(" ".join(f"{v:.10g}" for v in row) for row in m)
        text = f"# {MATRIX_CONVENTION}\n{rows}\n"
    return _atomic_write(path, text + ("" if text.endswith("\n") else "\n"))


def read_world_matrix(path) -> np.ndarray:
    """Read a file of :func:`write_world_matrix` (JSON or text) back into ``(4, 4)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"world matrix file not found: {path}")
    try:
        if path.suffix.lower() == ".json":
            m = json.loads(path.read_text())["matrix"]
        else:
            m = np.loadtxt(path, comments="#")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a world matrix file ({exc})") from None
    return check_matrix(m, f"the matrix in {path}")
