// ReDoc for /openapi.json, from files served by this server only (no CDN, no web fonts).
Redoc.init("openapi.json", { disableSearch: false, hideDownloadButton: false }, document.getElementById("redoc"));
