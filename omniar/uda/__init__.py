"""omniar.uda: unsupervised domain adaptation of timm classifiers (BiPC, DANN, source-only).

``model`` (BiPC heads, relationship matrix), ``losses`` (CPA, CGI, ramp, gradient reversal), ``data``
(image domains, offline digits) and ``train`` (the trainer and its evaluation, ``omniar train uda``).
"""
