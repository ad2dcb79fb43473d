"""The distillation application: config, data, teacher cache, models, trainer and the ``ibkd`` commands
that train with them. It builds on the library (:mod:`ibkd.losses`, :mod:`ibkd.functional`) and is never
imported by it."""
