"""nbval settings for the course notebooks (``pytest --nbval-lax notebooks/``).

Every notebook runs in the ci profile, checks included. Notebooks that need a
well-trained network load the checkpoints in ``checkpoints/`` (made by
``regedu train``; the command is next to each file).
"""
