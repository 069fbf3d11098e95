// Swagger UI for /openapi.json, from files served by this server only (no CDN, no inline script).
// With an API key set, the Authorize button takes it (the document declares a bearer scheme).
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null, // the default badge would ask validator.swagger.io about our schema
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  layout: "BaseLayout",
});
