"""SAM's prompts as one labelled point list (numpy), the form `sam_runner.PointPromptDecoder` and its ONNX graph take.

Boxes become their two corners with labels 2 and 3; points keep labels 1 (foreground) and 0
(background) and get SAM's padding point (label -1) appended, as SAM's own ONNX model expects.
Coordinates are pixels in the 1024-resized frame.
"""

from __future__ import annotations

import numpy as np


def box_prompts(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bx4 XYXY boxes (1024 frame) -> (Bx2x2 corner coords, Bx2 labels 2/3), SAM's box encoding."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    coords = boxes.reshape(-1, 2, 2)
    labels = np.tile(np.array([[2.0, 3.0]], dtype=np.float32), (len(boxes), 1))
    return coords, labels


def point_prompts(points: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BxNx2 points + BxN labels -> the same with SAM's padding point (label -1) appended.

    SAM's prompt encoder appends this point itself when no box is given; the ONNX decoder expects
    the caller to do it, as SAM's own ONNX model does.
    """
    points = np.asarray(points, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.float32)
    pad_coords = np.zeros((points.shape[0], 1, 2), dtype=np.float32)
    pad_labels = -np.ones((labels.shape[0], 1), dtype=np.float32)
    return np.concatenate([points, pad_coords], axis=1), np.concatenate([labels, pad_labels], axis=1)
