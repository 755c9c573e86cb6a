"""jaxsd.tasks: datasets -> chat prompts; verifiers with environment feedback; teacher contexts.

`get_task(name, **kwargs)` builds a registered task; `task_names()` lists them.
"""

from jaxsd.tasks import code, math, miniature, science, synthetic, tool_use  # noqa: F401
from jaxsd.tasks.base import (
    DataFileError,
    RecordError,
    Task,
    Verdict,
    default_data_dir,
    get_task,
    register_task,
    task_names,
    task_parameters,
)
from jaxsd.tasks.reprompt import (
    TeacherPrompt,
    build_group_reprompts,
    build_privileged_context,
    build_reprompt,
    chat_token_ids,
    select_solution,
    select_ssopd_pair,
    strip_thinking,
)

__all__ = [
    "DataFileError",
    "RecordError",
    "Task",
    "TeacherPrompt",
    "Verdict",
    "build_group_reprompts",
    "build_privileged_context",
    "build_reprompt",
    "chat_token_ids",
    "default_data_dir",
    "get_task",
    "register_task",
    "select_solution",
    "select_ssopd_pair",
    "strip_thinking",
    "task_names",
    "task_parameters",
]
