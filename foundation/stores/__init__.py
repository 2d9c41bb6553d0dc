"""The stores: each alone knows the layout of one part of the workspace and answers the questions the
rest of the project asks of it (the current dataset version, a finished run, a model's champion, ...).
Reach them through a `Workspace`: `workspace.datasets`, `.drops`, `.runs`, `.registry`, `.landing`.
"""
