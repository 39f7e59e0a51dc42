"""The MONAI Label side of monai-sal: served-model configs, infer tasks, train tasks and HTTP errors.

Laid out as MONAI Label expects (``configs/`` one TaskConfig per served model, ``infers/``,
``trainers/``); everything here is a thin adapter over the core library (``inference``,
``models``, ``data``, ``metrics``), which never imports it.
"""
