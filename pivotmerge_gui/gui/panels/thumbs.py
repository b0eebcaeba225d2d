"""Images of image-caption pairs as Qt images and list/table thumbnails."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QIcon, QImage, QPixmap

THUMB = 56


def image_to_qimage(image: Any) -> QImage:
    """A pair's image (``[3, H, W]`` tensor in [0, 1] or Pillow image) as a QImage."""
    from pivotmerge_gui.core.evaluation.pairs import tensor_to_pil

    pil = tensor_to_pil(image) if hasattr(image, "detach") else image.convert("RGB")
    data = pil.tobytes("raw", "RGB")
    q = QImage(data, pil.size[0], pil.size[1], 3 * pil.size[0], QImage.Format.Format_RGB888)
    return q.copy()  # own the buffer


def thumb_icon(image: Any) -> QIcon:
    q = image_to_qimage(image)
    mode = Qt.TransformationMode.FastTransformation if max(q.width(), q.height()) < THUMB else \
        Qt.TransformationMode.SmoothTransformation
    return QIcon(QPixmap.fromImage(q.scaled(THUMB, THUMB, Qt.AspectRatioMode.KeepAspectRatio, mode)))
