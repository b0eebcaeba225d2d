"""The app's state without Qt: experts, base, calibration, method, results, recipe in/out.

napari's ``ViewerModel`` is the example: the session model holds and checks the state, the
Qt window renders it and forwards the user's edits. Tests drive it without a QApplication.
"""

from .events import Event
from .experts import ExpertEntry, ExpertList, describe_projector
from .model import Readiness, SessionModel

__all__ = ["Event", "ExpertEntry", "ExpertList", "Readiness", "SessionModel", "describe_projector"]
