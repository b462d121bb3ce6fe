"""Sphinx configuration of the workbook's website (tools/site.py copies it beside the pages it writes)."""

project = "Efficient transformer inference on one and several GPUs"
author = "the workbook's authors"
extensions = ["myst_nb"]
html_theme = "sphinx_book_theme"
html_title = project
html_theme_options = {"show_toc_level": 2}
html_context = {"default_mode": "light"}  # else the theme logs "Got invalid theme mode" in the console
nb_execution_mode = "off"  # the pages show the outputs of a `labkit run`; building executes nothing
nb_merge_streams = True
myst_heading_anchors = 3  # links to a section of another notebook (#a-heading) resolve
suppress_warnings = ["myst.header"]  # a notebook's "### ..." under a section it skips a level from is fine on a page
exclude_patterns = ["_build"]
html_favicon = "favicon.svg"  # a page without an icon makes the browser ask the server for /favicon.ico
