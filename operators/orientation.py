"""EXIF orientation: models see the photo upright; boxes are reported in stored-pixel coordinates.

`upright(img, o)` turns stored pixels into the displayed image for EXIF orientation `o` (1..8);
`boxes_to_stored` maps boxes found on the upright image back onto the stored pixels.
"""

from __future__ import annotations

import numpy as np


def upright(img: np.ndarray, orientation: int) -> np.ndarray:
    o = orientation
    if o == 2:
        img = img[:, ::-1]
    elif o == 3:
        img = img[::-1, ::-1]
    elif o == 4:
        img = img[::-1]
    elif o == 5:
        img = img.transpose(1, 0, 2)
    elif o == 6:
        img = img[::-1].transpose(1, 0, 2)
    elif o == 7:
        img = img[::-1, ::-1].transpose(1, 0, 2)
    elif o == 8:
        img = img[:, ::-1].transpose(1, 0, 2)
    return np.ascontiguousarray(img)


def boxes_to_stored(boxes: np.ndarray, orientation: int, width: int, height: int) -> np.ndarray:
    """Boxes (N, 4) on the upright image -> boxes on the stored image of `width` x `height`."""
    o = orientation
    if o in (0, 1) or len(boxes) == 0:
        return boxes
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    if o == 2:
        xs, ys = (width - x2, width - x1), (y1, y2)
    elif o == 3:
        xs, ys = (width - x2, width - x1), (height - y2, height - y1)
    elif o == 4:
        xs, ys = (x1, x2), (height - y2, height - y1)
    elif o == 5:
        xs, ys = (y1, y2), (x1, x2)
    elif o == 6:
        xs, ys = (y1, y2), (height - x2, height - x1)
    elif o == 7:
        xs, ys = (width - y2, width - y1), (height - x2, height - x1)
    else:  # 8
        xs, ys = (width - y2, width - y1), (x1, x2)
    return np.stack([xs[0], ys[0], xs[1], ys[1]], axis=1).astype(np.float32)
