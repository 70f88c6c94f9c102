"""The HTML report of a scoring run: what the run wrote (load), its rows against labelled test
images (labels), its figures (plots) and the page (page), put together by write.write_report."""
