"""mkdocs hook: underscores never mark emphasis, on the pages and in the docstrings that
mkdocstrings renders. The docstrings write indices with underscores (``G ×_0 U_0 ×_1
U_1``), which Markdown would otherwise turn into italics, dropping them; the pages use
``*`` for emphasis."""

from markdown import Extension
from mkdocs.plugins import event_priority


class UnderscoresAreText(Extension):
    def extendMarkdown(self, md):
        if hasattr(md, "delimiters"):  # Python-Markdown 3.11 on: one processor for * and _
            md.delimiters.remove("_")
        else:
            md.inlinePatterns.deregister("em_strong2")


@event_priority(100)  # before mkdocstrings reads the extensions
def on_config(config):
    config.markdown_extensions.append(UnderscoresAreText())
    return config
