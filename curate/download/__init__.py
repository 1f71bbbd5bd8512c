"""The crawl policy built into img2dataset: public addresses only, robots.txt, size and
time limits, guarded image decoding, and the kinds a failed download is recorded as."""
