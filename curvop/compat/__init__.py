"""Compatibility layers for other libraries' APIs.

:mod:`curvop.compat.laplace` holds laplace-torch backends (import it explicitly; it needs the
``laplace`` extra: ``pip install 'curvop[laplace]'``).
"""
