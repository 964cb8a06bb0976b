"""Tasks generated locally and deterministically from a seed (see ``base`` for batch formats)."""

from jattn.data.base import FORMATS, Task, TaskSpec
from jattn.data.copying import Copying
from jattn.data.listops import ListOps
from jattn.data.recall import AssociativeRecall
from jattn.data.text import CharLM

TASKS = {"listops": ListOps, "recall": AssociativeRecall, "copying": Copying, "text": CharLM}
"""Task name (the config's ``task.name``) -> its dataclass, whose fields are the task options."""

__all__ = ["FORMATS", "TASKS", "AssociativeRecall", "CharLM", "Copying", "ListOps", "Task", "TaskSpec"]
