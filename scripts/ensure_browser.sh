#!/usr/bin/env bash
# The label app's browser test drives Debian's chromium. Install it when it is missing;
# where it cannot be installed, the test skips with a clear message.
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
  echo "chromium missing and cannot be installed here: the browser test will skip"; exit 0
fi
echo "installing Debian's chromium for the browser test..."
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
  || echo "chromium could not be installed: the browser test will skip"
