"""The main job (``bash scripts/demo.sh``): the whole workflow on the embedded data and models.

* :mod:`.workflow`: :func:`~.workflow.run_demo`, phantoms -> network -> evaluation -> profiles -> example;
* :mod:`.semcrc_intervals`: the sem-CRC part, organ-dependent intervals of the shipped denoiser;
* :mod:`.report`: the demo's ``report.md``.
"""
