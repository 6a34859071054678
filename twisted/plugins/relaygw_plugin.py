"""
twistd plugin: C{twistd -n relaygw [-c PATH]}.

Imports only L{ServiceMaker}; L{relaygw.tap} is imported when the plugin is used.
"""

from twisted.application.service import ServiceMaker

relaygw = ServiceMaker(
    "relaygw",
    "relaygw.tap",
    "SMTP relay gateway with Exchange-style receive connectors",
    "relaygw",
)
