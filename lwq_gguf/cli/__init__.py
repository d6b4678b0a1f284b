"""The command line: ``lwq-gguf score | plan | convert | eval | compare | inspect``.

Thin: argparse (:mod:`.parser`), then the user's intent built once into frozen configs
(:class:`Job`, :class:`PlanConfig`, :class:`ScoreConfig`, :class:`ImatrixChoice`, ...), one call
into the pipeline, a printed summary (:mod:`.commands`). Every user error ends in one
``lwq-gguf: error:`` line and a non-zero exit; an unexpected one in one line saying it is a bug
(traceback with ``--debug`` or ``LWQ_DEBUG=1``; :mod:`.main`).
"""
