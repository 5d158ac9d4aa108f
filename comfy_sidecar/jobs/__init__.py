"""Jobs that outlive a request: the job model (:mod:`.model`, :mod:`.record`, :mod:`.spec`,
:mod:`.progress`), their lifecycle on the replica that runs them (:mod:`.lifecycle`), and the
job backend chosen once at start-up (:mod:`.backend`: :mod:`.local` in-process, or Redis)."""
