"""The live dashboard: pages at ``/ui`` on the local gateway and from ``emnist dashboard``.

:mod:`.sources` says where the data comes from (the one place), :mod:`.views` shapes it for
the pages, :mod:`.app` serves the pages, assets and JSON, :mod:`.server` is ``emnist
dashboard``'s own server for a gateway elsewhere. The pages (``static/``) are hand-made HTML,
CSS and JavaScript with SVG charts: nothing is fetched from outside.
"""
